"""N (with and without embeddings) and FLOPs per token of a model config, without building it:
the trainer's ModelConfig counts them, so the plan and the trained model agree."""
from __future__ import annotations

import dataclasses

from core.model_config import ModelConfig


def model_numbers(model: dict, seq_len: int) -> tuple[int, int, float]:
    """(n_params incl. embeddings, n_params excl. embeddings, flops_per_token)."""
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(model) - names
    if unknown:
        raise ValueError(f"model keys {sorted(unknown)} are not fields of trainer ModelConfig")
    cfg = ModelConfig(**model)
    return (int(cfg.num_params(include_embedding=True)), int(cfg.num_params(include_embedding=False)),
            float(cfg.flops_per_token(seq_len)))
