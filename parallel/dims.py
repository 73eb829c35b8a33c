"""Sizes of the parallel dimensions for a world size, and the device mesh over them."""
from __future__ import annotations

from dataclasses import dataclass

from launch.context import DistContext
from parallel.config import ParallelConfig
from trainer.config_parse import ConfigError


@dataclass
class ParallelDims:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    mesh: object = None          # torch DeviceMesh over (pp, dp_replicate, dp_shard, tp) when world > 1
    dp_rank: int = 0
    dp_size: int = 1

    @classmethod
    def resolve(cls, cfg: ParallelConfig, world_size: int) -> "ParallelDims":
        fixed = cfg.pp * cfg.dp_replicate * cfg.tp
        shard = cfg.dp_shard
        if shard == -1:
            if world_size % fixed:
                raise ConfigError(f"parallel: pp*dp_replicate*tp = {fixed} does not divide the world size {world_size}")
            shard = world_size // fixed
        if fixed * shard != world_size:
            raise ConfigError(
                f"parallel: pp({cfg.pp}) x dp_replicate({cfg.dp_replicate}) x dp_shard({shard}) x tp({cfg.tp}) = "
                f"{fixed * shard}, but the world size is {world_size}")
        return cls(pp=cfg.pp, dp_replicate=cfg.dp_replicate, dp_shard=shard, tp=cfg.tp, world_size=world_size,
                   dp_size=cfg.dp_replicate * shard)


def build_mesh(cfg: ParallelConfig, ctx: DistContext) -> ParallelDims:
    dims = ParallelDims.resolve(cfg, ctx.world_size)
    if ctx.world_size > 1:
        raise ConfigError("parallel: multi-process layouts land with the N-D parallel work (issue 4)")
    return dims
