"""Global gradient norm and clipping that equal the single-device values under any layout.

Hand-written because torch's clip_grad_norm_ cannot combine DTensors on different meshes with
plain tensors, nor sum over pipeline stages (each stage holds other parameters).
"""
from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate
from torch.distributed.tensor.placement_types import _StridedShard


def _is_shard(placement) -> bool:
    # FSDP over TP gives _StridedShard, which is not a Shard subclass in torch 2.13.
    return placement.is_shard() or isinstance(placement, _StridedShard)


def settle_partial_grads(params) -> None:
    """Reduce Partial gradients (norm weights under sequence parallel) to the parameter's layout,
    so clipping, logging and the optimizer see true gradients."""
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and any(isinstance(pl, Partial) for pl in g.placements):
            target = p.placements if isinstance(p, DTensor) else [Replicate()] * g.device_mesh.ndim
            p.grad = g.redistribute(g.device_mesh, [Replicate() if isinstance(t, Partial) else t for t in target])


def grad_norm(params, pp_group=None) -> torch.Tensor:
    """L2 norm of all gradients of the job: squares summed over the shards of each DTensor (one
    all-reduce per sharded mesh dimension and layout group), then over pipeline stages."""
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = defaultdict(list)
    device = None
    for g in grads:
        if isinstance(g, DTensor):
            shard_dims = tuple(i for i, pl in enumerate(g.placements) if _is_shard(pl))
            groups[(id(g.device_mesh), shard_dims)].append(g)
            device = g.to_local().device
        else:
            groups[None].append(g)
            device = g.device
    total = torch.zeros((), dtype=torch.float32, device=device or "cpu")
    for key, members in groups.items():
        locals_ = [g.to_local() if isinstance(g, DTensor) else g for g in members]
        sq = torch.stack([torch.linalg.vector_norm(t, dtype=torch.float32) ** 2 for t in locals_]).sum()
        if key is not None:
            mesh = members[0].device_mesh
            for dim in key[1]:
                dist.all_reduce(sq, group=mesh.get_group(dim))
        total = total + sq
    if pp_group is not None:
        dist.all_reduce(total, group=pp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grads_(params, max_norm: float, pp_group=None) -> torch.Tensor:
    """Scale gradients so their global norm is at most max_norm (torch's formula); return the norm."""
    params = [p for p in params if p.grad is not None]
    norm = grad_norm(params, pp_group)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            # Scale the local shard in place (to_local() is a view): the same product as scaling
            # the DTensor, without turning coef into a Python number, a host sync per parameter.
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device))
    return norm
