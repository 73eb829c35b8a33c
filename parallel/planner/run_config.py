"""Read what the planner needs from a meshformer run config (core's `load_config`: TOML +
`--section.key value` overrides, validated): the model shape and the layout it asks for.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.layout import microbatches, resolve_sizes
from core.model_config import ModelConfig
from core.parallel_config import ParallelConfig
from core.run_config import Config, load_config

from .layout import Layout


@dataclass(frozen=True)
class RunSettings:
    model: ModelConfig
    parallel: ParallelConfig
    batch_size: int         # train.batch_size: sequences per DP rank per step (per accumulation step without PP)
    grad_accum: int
    seq_len: int
    dtype: str


def read_run_config(path: str, overrides: list[str] = ()) -> RunSettings:
    return run_settings(load_config(path, list(overrides)))


def run_settings(cfg: Config) -> RunSettings:
    """What the planner needs of an already loaded run config (the trainer's start-up check)."""
    if not cfg.model.vocab_size:     # auto, and the tokenizer's size is in a file only training reads
        raise ConfigError(f"model.vocab_size: 0 (auto) follows data.tokenizer={cfg.data.tokenizer!r} at training "
                          "time; the planner needs a number: --model.vocab_size N")
    return RunSettings(model=cfg.model, parallel=cfg.parallel, batch_size=cfg.train.batch_size,
                       grad_accum=cfg.train.grad_accum, seq_len=cfg.train.seq_len, dtype=cfg.precision.dtype)


def default_gpus(run: RunSettings) -> int:
    """The GPUs the config's layout names (dp_shard = -1 read as 1)."""
    par = run.parallel
    return par.tp * par.pp * par.cp * par.dp_replicate * max(1, par.dp_shard)


def config_layout(run: RunSettings, gpus: int) -> Layout:
    """The layout the run config asks for on `gpus` GPUs, with the sizes and the default
    microbatch count the trainer itself would use (core/layout.py)."""
    par = run.parallel
    try:
        sizes = resolve_sizes(par, gpus)
    except ConfigError as e:
        raise ConfigError(f"--gpus {gpus}: {e}") from None
    if par.pp > 1:
        m = microbatches(par)
        if run.batch_size % m:
            raise ConfigError(f"parallel.pp_microbatches: {m} does not divide train.batch_size = {run.batch_size}")
        mb = run.batch_size // m
    else:
        m, mb = run.grad_accum, run.batch_size
    return Layout(tp=sizes.tp, pp=sizes.pp, pp_virtual_stages=par.pp_virtual_stages, dp_replicate=sizes.dp_replicate,
                  dp_shard=sizes.dp_shard, micro_batch=mb, microbatches=m, pp_schedule=par.pp_schedule,
                  sp=par.sp and sizes.tp > 1, ac=par.ac, dtype=run.dtype, seq_len=run.seq_len,
                  cp=sizes.cp, ep=getattr(par, "ep", 1))
