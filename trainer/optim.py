"""AdamW with decoupled weight decay on matrices only, and the learning-rate schedules."""
from __future__ import annotations

import math

import torch
from torch import nn

from core.model_config import ModelConfig
from core.train_config import OptimConfig
from trainer.model import Transformer


def model_config_of(model: nn.Module) -> ModelConfig | None:
    """The ModelConfig of the Transformer in `model` (the model, a wrapped one, or a pipeline
    rank's list of stages, each a Transformer with the same config); None for another module."""
    return next((m.cfg for m in model.modules() if isinstance(m, Transformer)), None)


def param_groups(model: nn.Module, weight_decay: float, lr: float) -> list[dict]:
    """Decay the matrices of linear layers; not norms, biases or embedding tables
    (decaying an embedding row pulls rare tokens to zero).

    Under muP (model.parametrization = "mup") the blocks' matrices (hidden weights: the only
    parameters with two dimensions that grow with width) get their own group with Adam's LR
    divided by the width multiplier m (Tensor Programs V, Table 3) and the weight decay multiplied
    by m, so that AdamW's per-step decay lr * wd stays what it was at the base width (mup's MuAdamW
    does the same). Embeddings, the readout (its 1/m is a forward multiplier), norms and biases keep
    lr. The groups are [no decay, decayed readout (if any), hidden]: group 0 carries the base LR,
    which the trainer logs, on every pipeline stage; empty groups are left out."""
    decay, no_decay, hidden, seen = [], [], [], set()
    mc = model_config_of(model)
    mup = mc is not None and mc.parametrization == "mup"
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = "embeddings" in name and "output" not in name
        if p.ndim < 2 or is_embedding:
            no_decay.append(p)
        elif mup and "layers" in name.split("."):
            hidden.append(p)
        else:
            decay.append(p)
    if not mup:
        return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    m = mc.width_mult
    groups = [{"params": no_decay, "weight_decay": 0.0, "lr": lr},
              {"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": hidden, "weight_decay": weight_decay * m, "lr": lr / m}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    if cfg.fused and device.type == "cuda":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, cfg.lr), **kwargs)


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
