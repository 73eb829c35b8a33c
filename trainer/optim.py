"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from core.train_config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices of linear layers; not norms, biases or embedding tables
    (decaying an embedding row pulls rare tokens to zero)."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embeddings" in name and "output" not in name
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.fused and device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based) out of `total`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, total - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    # warmup-stable-decay: constant, then a decay over the final `decay` steps.
    decay = cfg.decay_steps or int(round(cfg.decay_fraction * total))
    start = total - decay
    if decay <= 0 or step < start:
        return 1.0
    progress = min(1.0, (step - start + 1) / decay)
    if cfg.decay_shape == "linear":
        shape = 1 - progress
    elif cfg.decay_shape == "1-sqrt":
        shape = 1 - math.sqrt(progress)
    else:
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    return floor + (1 - floor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
