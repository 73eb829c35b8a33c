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


def active_numbers(model: dict) -> tuple[int, int]:
    """(active parameters incl. embeddings, excl. embeddings): what one token uses; a dense
    model's are its n_params."""
    cfg = ModelConfig(**model)
    return int(cfg.num_params(active=True)), int(cfg.num_params(include_embedding=False, active=True))


def check_model(model: dict) -> None:
    """ModelConfig's own validation (ValueError naming the model.* key)."""
    ModelConfig(**model).validate()


def dense_hidden(model: dict) -> int:
    """The dense MLP width of this model (ModelConfig.hidden)."""
    return ModelConfig(**model).hidden
