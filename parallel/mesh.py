"""The named DeviceMesh for a layout, and the checks that a layout fits the model and schedule."""
from __future__ import annotations

from torch.distributed.device_mesh import init_device_mesh

from parallel.config import ParallelConfig
from parallel.dims import MESH_DIMS, ParallelDims
from trainer.config_parse import ConfigError


def build_mesh(cfg: ParallelConfig, ctx) -> ParallelDims:
    """Resolve the sizes against the world and, for world > 1, build one DeviceMesh named
    (pp, dp_replicate, dp_shard, tp) with a flattened "dp" (replicate x shard) sub-mesh."""
    dims = ParallelDims.resolve(cfg, ctx.world_size)
    if ctx.world_size == 1:
        return dims
    if not ctx.distributed:
        raise ConfigError(f"parallel: world size {ctx.world_size} without a process group; launch with torchrun")
    shape = tuple(getattr(dims, name) for name in MESH_DIMS)
    mesh = init_device_mesh(ctx.device.type, shape, mesh_dim_names=MESH_DIMS)
    # Private but stable since torch 2.6 and what torchtitan uses; the public replacement is not in 2.11.
    # Kept on dims: slicing a flattened dim from the root mesh is deprecated.
    dims.dp_flat_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    dims.mesh = mesh
    dims.dp_rank = dims.dp_flat_mesh.get_local_rank()
    dims.pp_rank = mesh["pp"].get_local_rank()
    dims.tp_rank = mesh["tp"].get_local_rank()
    return dims


def microbatches(cfg: ParallelConfig) -> int:
    return cfg.pp_microbatches or cfg.pp * cfg.pp_virtual_stages


def stage_layer_counts(cfg: ParallelConfig, n_layers: int) -> list[int]:
    """Layers in each pipeline stage (pp * virtual stages of them): pp_layers, or as even as
    possible with the extra layers on the earlier stages."""
    n_stages = cfg.pp * cfg.pp_virtual_stages
    if cfg.pp_layers:
        return list(cfg.pp_layers)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def validate_layout(cfg: ParallelConfig, model_cfg, batch_size: int, seq_len: int = 0) -> None:
    """Checks that need the model and batch as well as the layout; each error names the field."""
    tp = cfg.tp
    if tp > 1:
        for what, value in (("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.kv_heads),
                            ("the MLP width (model.ffn_hidden)", model_cfg.hidden),
                            ("model.vocab_size (vocab-parallel head)", model_cfg.vocab_size)):
            if value % tp:
                raise ConfigError(f"parallel.tp: {tp} does not divide {what} = {value}; pick a tp that divides it")
        if cfg.sp and seq_len % tp:
            raise ConfigError(f"parallel.sp: sequence parallel splits train.seq_len = {seq_len} over tp = {tp}; "
                              "use a multiple of tp or parallel.sp = false")
    n_stages = cfg.pp * cfg.pp_virtual_stages
    if cfg.pp > 1 or cfg.pp_virtual_stages > 1:
        if n_stages > model_cfg.n_layers:
            raise ConfigError(f"parallel.pp: {cfg.pp} x {cfg.pp_virtual_stages} virtual stages = {n_stages} stages "
                              f"but the model has only model.n_layers = {model_cfg.n_layers} layers")
        if cfg.pp_layers:
            if len(cfg.pp_layers) != n_stages or sum(cfg.pp_layers) != model_cfg.n_layers or min(cfg.pp_layers) < 1:
                raise ConfigError(f"parallel.pp_layers: {cfg.pp_layers} must list {n_stages} positive counts "
                                  f"(pp x pp_virtual_stages) summing to model.n_layers = {model_cfg.n_layers}")
        if model_cfg.tie_embeddings:
            raise ConfigError("model.tie_embeddings: a tied head cannot live on another pipeline stage than the "
                              "embedding; set it false or parallel.pp = 1")
        multi = cfg.pp_schedule in ("interleaved_1f1b", "zero_bubble")
        if cfg.pp_virtual_stages > 1 and not multi:
            raise ConfigError(f"parallel.pp_virtual_stages: {cfg.pp_virtual_stages} needs an interleaved schedule "
                              f"(interleaved_1f1b or zero_bubble), not {cfg.pp_schedule!r}")
        m = microbatches(cfg)
        if m < cfg.pp:
            raise ConfigError(f"parallel.pp_microbatches: {m} is fewer than the {cfg.pp} pipeline stages; "
                              f"use at least parallel.pp = {cfg.pp}")
        if multi and m % cfg.pp:
            raise ConfigError(f"parallel.pp_microbatches: {m} must be a multiple of parallel.pp = {cfg.pp} "
                              f"for the {cfg.pp_schedule} schedule")
        if batch_size % m:
            raise ConfigError(f"parallel.pp_microbatches: {m} does not divide train.batch_size = {batch_size}")
