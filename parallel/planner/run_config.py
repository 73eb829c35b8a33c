"""Read what the planner needs from a meshformer run config (via the trainer's `load_config`:
TOML + `--section.key value` overrides, validated): the model shape and the layout it asks for.
"""
from __future__ import annotations

from dataclasses import dataclass

from trainer.config import load_config
from trainer.model_config import ModelConfig

from .layout import Layout


@dataclass(frozen=True)
class RunSettings:
    model: ModelConfig
    parallel: dict          # the [parallel] table (keys as in parallel/config.py)
    batch_size: int         # train.batch_size: sequences per DP rank per step (per accumulation step without PP)
    grad_accum: int
    seq_len: int
    dtype: str


_PARALLEL_KEYS = ("dp_replicate", "dp_shard", "tp", "pp", "sp", "pp_schedule", "pp_microbatches",
                  "pp_virtual_stages", "ac")


def read_run_config(path: str, overrides: list[str] = ()) -> RunSettings:
    cfg = load_config(path, list(overrides))
    par = {k: getattr(cfg.parallel, k) for k in _PARALLEL_KEYS}
    return RunSettings(model=cfg.model, parallel=par, batch_size=cfg.train.batch_size,
                       grad_accum=cfg.train.grad_accum, seq_len=cfg.train.seq_len, dtype=cfg.precision.dtype)


def config_layout(run: RunSettings, gpus: int) -> Layout:
    """The layout the run config asks for on `gpus` GPUs (dp_shard = -1 fills the rest)."""
    par = run.parallel
    tp, pp, rep, shard = int(par["tp"]), int(par["pp"]), int(par["dp_replicate"]), int(par["dp_shard"])
    if shard == -1:
        if gpus % (tp * pp * rep):
            raise ValueError(f"--gpus {gpus} is not divisible by parallel.tp x pp x dp_replicate = {tp * pp * rep}")
        shard = gpus // (tp * pp * rep)
    if tp * pp * rep * shard != gpus:
        raise ValueError(f"parallel.tp x pp x dp_replicate x dp_shard = {tp * pp * rep * shard} but --gpus is {gpus}")
    if pp > 1:
        m = int(par["pp_microbatches"]) or pp
        if run.batch_size % m:
            raise ValueError(f"train.batch_size {run.batch_size} is not divisible by parallel.pp_microbatches {m}")
        mb = run.batch_size // m
    else:
        m, mb = run.grad_accum, run.batch_size
    return Layout(tp=tp, pp=pp, pp_virtual_stages=int(par["pp_virtual_stages"]), dp_replicate=rep, dp_shard=shard,
                  micro_batch=mb, microbatches=m, pp_schedule=str(par["pp_schedule"]), sp=bool(par["sp"]) and tp > 1,
                  ac=str(par["ac"]), dtype=run.dtype, seq_len=run.seq_len)
