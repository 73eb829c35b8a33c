"""Read what the planner needs from a meshformer run config: the model shape and the layout.

Uses the trainer's `load_config` (TOML + `--section.key value` overrides, validated) when it is
there; on a branch without it, reads the same tables with tomllib so the planner still runs.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

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


_PARALLEL_DEFAULTS = {"dp_replicate": 1, "dp_shard": -1, "tp": 1, "pp": 1, "sp": True, "pp_schedule": "1f1b",
                      "pp_microbatches": 0, "pp_virtual_stages": 1, "ac": "none"}


def read_run_config(path: str, overrides: list[str] = ()) -> RunSettings:
    try:
        from trainer.config import load_config
    except ImportError:
        return _read_tables(path, list(overrides))
    cfg = load_config(path, list(overrides))
    par = {k: getattr(cfg.parallel, k) for k in _PARALLEL_DEFAULTS}
    return RunSettings(model=cfg.model, parallel=par, batch_size=cfg.train.batch_size,
                       grad_accum=cfg.train.grad_accum, seq_len=cfg.train.seq_len, dtype=cfg.precision.dtype)


def _read_tables(path: str, overrides: list[str]) -> RunSettings:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {path!r} not found")
    tables = tomllib.loads(p.read_text())
    if len(overrides) % 2:
        raise ValueError(f"overrides come in pairs '--section.key value', got {overrides}")
    for key, value in zip(overrides[::2], overrides[1::2]):
        if not key.startswith("--") or "." not in key:
            raise ValueError(f"override {key!r}: write it as --section.key value")
        section, name = key[2:].split(".", 1)
        tables.setdefault(section, {})[name] = _parse_value(value)
    model_fields = {f.name for f in fields(ModelConfig)}
    unknown = set(tables.get("model", {})) - model_fields
    if unknown:
        raise ValueError(f"{path}: unknown [model] keys {sorted(unknown)}")
    model = ModelConfig(**tables.get("model", {}))
    model.validate()
    train, prec = tables.get("train", {}), tables.get("precision", {})
    par = {**_PARALLEL_DEFAULTS, **{k: v for k, v in tables.get("parallel", {}).items() if k in _PARALLEL_DEFAULTS}}
    return RunSettings(model=model, parallel=par, batch_size=int(train.get("batch_size", 16)),
                       grad_accum=int(train.get("grad_accum", 1)), seq_len=int(train.get("seq_len", 128)),
                       dtype=str(prec.get("dtype", "fp32")))


def _parse_value(text: str):
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


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
