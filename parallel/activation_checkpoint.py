"""Activation checkpointing (full, or selective per op) and per-block torch.compile.

Both act on each Transformer block of a model part and keep parameter names unchanged (no
wrapper module in between), so checkpoints stay layout- and option-independent:
- checkpointing replaces the block instance's `forward` with one that runs the original under
  torch.utils.checkpoint (non-reentrant, so it composes with FSDP2 hooks and DTensor);
- compile uses nn.Module.compile(), which compiles the block's call in place.
In parallelize()'s fixed order checkpointing comes first, so a compiled block includes it.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# Selective: keep the outputs of the expensive ops (matmuls, attention) and of collectives (so a
# recompute never communicates again); recompute the cheap element-wise ops and norms.
_ops = torch.ops.aten
SAVE_OPS = {_ops.mm.default, _ops.addmm.default, _ops.bmm.default,
            _ops._scaled_dot_product_flash_attention_for_cpu.default,
            _ops._scaled_dot_product_efficient_attention.default,
            _ops._scaled_dot_product_flash_attention.default}
for _name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce"):
    if hasattr(torch.ops._c10d_functional, _name):
        SAVE_OPS.add(getattr(torch.ops._c10d_functional, _name).default)


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_policy)


def _checkpointed(forward, selective: bool, *args, **kwargs):
    extra = {"context_fn": _selective_context} if selective else {}
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False, **extra, **kwargs)


def apply_activation_checkpointing(model: nn.Module, blocks: str, mode: str) -> None:
    """mode: "none", "full" (keep only each block's input) or "selective" (see SAVE_OPS), on each
    module of the ModuleDict `model.<blocks>`."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.ac: {mode!r} is not one of none, full, selective")
    for block in getattr(model, blocks).values():
        block.forward = functools.partial(_checkpointed, block.forward, mode == "selective")


def apply_compile(model: nn.Module, blocks: str) -> None:
    """Compile each block separately: blocks are identical, so one compiled graph is reused and
    compile time does not grow with depth (and FSDP's per-block hooks stay outside the graph)."""
    for block in getattr(model, blocks).values():
        block.compile()
