"""The DeepSpeed config (ds_config) of a run: generated from our keys, with a user's
ds_config.json merged over it. Plain dicts, no DeepSpeed import.

Merge rule: a key the user's file sets wins over the generated one and every difference is named
in one line, except the keys the rest of the trainer depends on (batch sizes, accumulation,
precision): our data loader feeds those batches and our loss is normalised for them, so a
different value there is a ConfigError naming both values and the key to change instead.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import ConfigError
from core.parallel_config import ParallelConfig

# Keys that must agree with ours: the loader, the loss normalisation and the precision follow our config.
FIXED = {"train_batch_size": "train.batch_size", "train_micro_batch_size_per_gpu": "train.batch_size",
         "gradient_accumulation_steps": "train.grad_accum", "bf16.enabled": "precision.dtype",
         "fp16.enabled": "precision.dtype"}
# Sections our trainer builds itself (AdamW + our LR schedule): refused in a user's file for now.
REFUSED = {"optimizer": "optim.*", "scheduler": "optim.schedule / optim.warmup_steps"}


def offload(device: str, nvme_path: str) -> dict:
    return {"device": device, **({"nvme_path": nvme_path} if device == "nvme" else {})}


def generated_config(pcfg: ParallelConfig, micro_batch: int, grad_accum: int, dp_size: int,
                     dtype: str, grad_clip: float) -> dict:
    """The ds_config our keys describe."""
    zero: dict = {"stage": pcfg.zero_stage}
    if pcfg.offload_optimizer != "none":
        zero["offload_optimizer"] = offload(pcfg.offload_optimizer, pcfg.nvme_path)
    if pcfg.offload_param != "none":
        zero["offload_param"] = offload(pcfg.offload_param, pcfg.nvme_path)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * dp_size,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_optimization": zero,
        # Our torch AdamW is the client optimizer (DeepSpeed's fused/CPU Adam need compiled ops),
        # also under optimizer offload.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,       # our metrics log; DeepSpeed's own step prints off
        "wall_clock_breakdown": False,
    }


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def merge_under(ours: dict, theirs: dict, where: str) -> tuple[dict, list[str]]:
    """`theirs` over `ours` (nested); returns the merged config and the differences, each
    "key: ours -> theirs". A fixed key that differs is a ConfigError."""
    for key, what in REFUSED.items():
        if key in theirs:
            raise ConfigError(f"parallel.deepspeed_config: {where} has an {key!r} section; meshformer builds the "
                              f"optimizer and LR schedule from {what}: remove the section and set those keys")
    flat_ours, flat_theirs = flatten(ours), flatten(theirs)
    diffs = []
    for key, value in flat_theirs.items():
        if key in flat_ours and flat_ours[key] != value and value != "auto":
            if key in FIXED:
                raise ConfigError(f"parallel.deepspeed_config: {where} sets {key} = {value!r} but this run has "
                                  f"{flat_ours[key]!r}; set {FIXED[key]} instead (or remove the key)")
            diffs.append(f"{key}: {flat_ours[key]!r} -> {value!r}")
    merged = _deep_merge(ours, {k: v for k, v in theirs.items()})
    return merged, diffs


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if v == "auto" and k in base:          # HF-style "auto": take ours
            continue
        out[k] = _deep_merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def read_user_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"parallel.deepspeed_config: {path} is not a file (give a ds_config.json)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"parallel.deepspeed_config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config: {path} must hold a JSON object, got {type(data).__name__}")
    return data


def build_ds_config(pcfg: ParallelConfig, micro_batch: int, grad_accum: int, dp_size: int, dtype: str,
                    grad_clip: float) -> tuple[dict, list[str]]:
    """The run's ds_config and the differences a user's file made (for one line in the log)."""
    ours = generated_config(pcfg, micro_batch, grad_accum, dp_size, dtype, grad_clip)
    if not pcfg.deepspeed_config:
        return ours, []
    return merge_under(ours, read_user_config(pcfg.deepspeed_config), pcfg.deepspeed_config)
