"""Expert parallel: each rank of the `ep` mesh dimension holds E / ep of a MoE layer's experts, and
tokens travel to their experts and back with two all-to-alls.

The experts' stacked weights [E, ...] become `Shard(0)` DTensors over `ep` (FSDP may shard them
further over `edp_shard`, parallel/data_parallel.py), so parameter names and global shapes stay the
unsplit model's and DCP reshards a checkpoint across ep sizes. The model is untouched: its experts
module is called as `experts(x, offs)` with x its tokens sorted by expert and offs the int32
cumulative row counts per expert (trainer/moe.py); here that call becomes

    counts per expert --all_to_all--> counts each rank receives (one host read: the split sizes)
    tokens --all_to_all (autograd)--> this rank's experts' tokens, regrouped by local expert
    the model's own forward (grouped GEMM) on the local weight slices
    outputs --all_to_all (autograd, reverse)--> back in the caller's order

and the caller's gate weighting and un-permute are unchanged. The router is replicated: every rank
routes its own tokens, so expert loads and the DeepSeek bias are summed over data parallel as
without ep.
"""
from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from core.parallel_plan import ParallelPlan


def expert_modules(part: nn.Module, plan: ParallelPlan) -> list[nn.Module]:
    """The routed experts module of every MoE block this part holds (dense blocks have none)."""
    if not plan.moe_experts:
        return []
    found = []
    for block in getattr(part, plan.blocks).values():
        try:
            found.append(block.get_submodule(plan.moe_experts))
        except AttributeError:
            continue
    return found


def apply_expert_parallel(part: nn.Module, plan: ParallelPlan, dims, sp: bool) -> None:
    """Split every experts module's stacked weights over ep (dim 0) and route its calls. With tensor
    parallel the experts are not TP-split: Replicate over tp on the 2-D (ep, tp) mesh; each TP rank
    dispatches its own tokens (its sequence shard under SP, so its gradient is a Partial share
    over tp, as for the router: parallel/tensor.py) among the ep ranks of its own tp index."""
    ep_mesh = dims.ep_mesh
    group, ep = ep_mesh.get_group(), ep_mesh.size()
    mesh, placements, grads = ep_mesh, [Shard(0)], None
    if dims.tp_enabled:
        mesh, placements = dims.submesh("ep", "tp"), [Shard(0), Replicate()]
        grads = [Shard(0), Partial() if sp else Replicate()]
    for experts in expert_modules(part, plan):
        for name, p in list(experts.named_parameters(recurse=False)):
            # src_data_rank=None: each rank keeps its own chunk, no communication (works on meta too;
            # the values come later from parallel/sharded_init.py, drawn as the unsplit tensor).
            local = distribute_tensor(p.data, mesh, placements, src_data_rank=None)
            experts.register_parameter(name, nn.Parameter(local, requires_grad=p.requires_grad))
        # An instance attribute wins over the class's forward; nn.Module.__call__ (and FSDP's
        # hooks around it) still run as before.
        experts.forward = partial(ep_forward, experts, type(experts).forward, group, ep, grads)


def ep_forward(experts: nn.Module, forward, group, ep: int, grad_placements, x: torch.Tensor,
               offs: torch.Tensor) -> torch.Tensor:
    """`experts(x, offs)` with the experts spread over the `ep` ranks of `group` (see the module doc)."""
    n_experts = offs.numel()
    local_e = n_experts // ep
    counts = torch.diff(offs.long(), prepend=offs.new_zeros(1, dtype=torch.long))   # rows per global expert
    received = torch.empty_like(counts)            # [source rank, local expert], flattened
    dist.all_to_all_single(received, counts, group=group)
    recv = received.view(ep, local_e)
    # One host read (split sizes must be Python ints, as in torchtitan and Megatron).
    send_splits, recv_splits = (c.tolist() for c in torch.stack([counts.view(ep, local_e).sum(1), recv.sum(1)]).cpu())
    tokens = AllToAll.apply(x, send_splits, recv_splits, group)
    perm = by_local_expert(recv)
    local_offs = torch.cumsum(recv.sum(0), 0).to(torch.int32)
    with local_weights(experts, 1.0 / ep, grad_placements):
        y = forward(experts, tokens[perm], local_offs)
    back = torch.empty_like(perm)
    back[perm] = torch.arange(perm.numel(), device=perm.device)
    return AllToAll.apply(y[back], recv_splits, send_splits, group)


class AllToAll(torch.autograd.Function):
    """Rows of x, cut by send_splits, to the ranks of group; backward sends the gradients back.
    Ours rather than torch.distributed.nn's: that one returns its `output` argument, which autograd
    makes a view, and FSDP2 then warns on every call that a view leaves its module."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits = ctx.splits
        back = grad.new_empty(sum(send_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), send_splits, recv_splits, group=ctx.group)
        return back, None, None, None


def by_local_expert(recv: torch.Tensor) -> torch.Tensor:
    """Row order that regroups received tokens, which arrive by (source rank, local expert), by
    (local expert, source rank): the grouped GEMM wants each expert's rows together."""
    flat = recv.reshape(-1)
    start = (torch.cumsum(flat, 0) - flat).view_as(recv).T.reshape(-1)    # block starts, (expert, source) order
    sizes = recv.T.reshape(-1)
    block = torch.repeat_interleave(torch.arange(sizes.numel(), device=recv.device), sizes)
    within = torch.arange(block.numel(), device=recv.device) - (torch.cumsum(sizes, 0) - sizes)[block]
    return start[block] + within


@contextlib.contextmanager
def local_weights(experts: nn.Module, grad_scale: float, grad_placements=None):
    """Let the model's forward see this rank's slices as plain tensors (the grouped GEMM takes no
    DTensor). Written into `_parameters` directly, as FSDP2 swaps its gathered parameters in:
    `setattr` refuses a non-Parameter there; to_local() keeps the autograd path to the DTensor.

    `grad_scale` = 1 / ep: a local expert's gradient sums the tokens of all ep ranks, each carrying
    the dp_size / count loss factor meant for an average over dp_size ranks, but data parallel
    averages it over dp_size / ep ranks only (FSDP's edp_shard x dp_replicate). FSDP's own
    `set_gradient_divide_factor` would do this on NCCL; on gloo it needs PREMUL_SUM, which gloo lacks."""
    saved = dict(experts._parameters)
    try:
        for name, p in saved.items():
            if isinstance(p, DTensor):
                experts._parameters[name] = ScaleGrad.apply(p.to_local(grad_placements=grad_placements), grad_scale)
        yield
    finally:
        experts._parameters.update(saved)


class ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` (exact for a power-of-two ep)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None
