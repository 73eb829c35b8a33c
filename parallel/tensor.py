"""Tensor parallel (Megatron-style) and sequence parallel with DTensor's `parallelize_module`.

Per block: q/k/v column-wise (each rank holds n_heads/tp query heads and kv_heads/tp key/value
heads; Attention derives its local head count from the projected width), output projection
row-wise; MLP w1/w3 column-wise, w2 row-wise. With sequence parallel (SP) the residual stream
between the two halves of a block is sharded along the sequence: norms run on T/tp positions, an
all-gather precedes attention and the MLP, and the row-wise outputs are reduce-scattered.

Position information is always applied on full sequences: the embedding's output is replicated
(all-reduce rather than reduce-scatter), learned/sinusoidal positions are added to it, and the
first block of a stage slices its own sequence shard (no communication). This keeps the model
file free of parallel code, and RoPE sees the true sequence length in every block. A pipeline
stage that does not end the model all-gathers its last block's output, so stages exchange full
hidden states. The head is column-wise over the vocabulary; the loss then runs on vocab-sharded
logits under torch's `loss_parallel` without gathering them.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from core.parallel_plan import ParallelPlan

BLOCK_ARGS = 6          # TransformerBlock.forward / Attention.forward: (x, rope, start_pos, cache, positions, doc)


def _mlp_plan(module: str, mlp_in, mlp_out: str, seq) -> dict:
    """Megatron's MLP: one entry point ("f": under SP an all-gather of the sequence), column-wise
    in, row-wise out (reduce-scatter back to the sequence shard under SP)."""
    styles: dict = {name: ColwiseParallel() for name in mlp_in}
    styles[mlp_out] = RowwiseParallel(output_layouts=seq)
    styles[module] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
    return styles


def _block_plan(plan: ParallelPlan, sp: bool, block: nn.Module) -> dict:
    seq = Shard(1) if sp else Replicate()
    styles: dict = {name: ColwiseParallel() for name in (*plan.qkv, *plan.head_tables)}
    styles[plan.attention_out] = RowwiseParallel(output_layouts=seq)
    rest = (None,) * (BLOCK_ARGS - 1)
    # One entry point per half-block (Megatron's "f"/"g"): q/k/v (and w1/w3) take the same
    # DTensor input, so backward sums their input gradients before one all-reduce (or one
    # reduce-scatter under SP) instead of one per projection.
    styles[plan.attention] = PrepareModuleInput(input_layouts=(seq, *rest), desired_input_layouts=(Replicate(), *rest))
    if not _has(block, plan.moe_router):
        styles.update(_mlp_plan(plan.feed_forward, plan.mlp_in, plan.mlp_out, seq))
    elif _has(block, plan.moe_shared):
        # A MoE block: the MoE module takes the residual stream as it is (the rank's sequence shard
        # under SP); its shared experts gather and scatter the sequence like a dense MLP.
        styles.update(_mlp_plan(plan.moe_shared, plan.moe_shared_in, plan.moe_shared_out, seq))
    if sp:
        # Local outputs: the residual stream is plain local [B, T/tp, D] tensors, so adding
        # it works for pre- and post-norm blocks alike.
        styles[plan.attention_norm] = SequenceParallel(use_local_output=True)
        styles[plan.ffn_norm] = SequenceParallel(use_local_output=True)
    return styles


def _has(block: nn.Module, name: str) -> bool:
    try:
        return bool(name) and block.get_submodule(name) is not None
    except AttributeError:
        return False


def _replicate_used_locally(block: nn.Module, plan: ParallelPlan, tp_mesh, sp: bool) -> None:
    """The router and the routed experts of a MoE block are not split: their parameters become
    Replicate DTensors (like every parameter here, so the optimizer's foreach kernels and the
    gradient norm treat them alike), and the MoE forward computes with their local values on
    the tokens it is given, with no DTensor op in the routing (topk, sorting, grouped GEMM).

    Under SP those tokens are the rank's own slice of the sequence, so the gradient a rank
    computes is its share only: the local value is taken with a Partial gradient, which
    settle_partial_grads (or FSDP, reducing to the parameter's Replicate placement) sums over TP,
    the same path as the norm weights under SP. Without SP every TP rank routes every token and
    the gradient is already whole (Replicate). Why hooks that swap the local values in for the
    forward (torch.func.functional_call's mechanism) rather than an all-reduce hook on the
    gradients: the Partial placement composes with FSDP's own reduction and the existing clipping
    without a second code path, and the module keeps its parameter names."""
    grad_placements = [Partial() if sp else Replicate()]
    owners = [block.get_submodule(n) for n in (plan.moe_router, plan.moe_experts) if n]   # no experts: EP's
    for mod in owners:
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, tp_mesh, [Replicate()])))
    saved: list = []

    def use_local(module, args):
        # Read at each forward: FSDP swaps its unsharded parameters in just before (block pre-hook).
        for mod in owners:
            for pname, p in list(mod._parameters.items()):
                if isinstance(p, DTensor):
                    saved.append((mod, pname, p))
                    mod._parameters[pname] = p.to_local(grad_placements=grad_placements)

    def restore(module, args, output):
        while saved:
            mod, pname, p = saved.pop()
            mod._parameters[pname] = p

    moe = block.get_submodule(plan.feed_forward)
    moe.register_forward_pre_hook(use_local)
    moe.register_forward_hook(restore)


def _replicate(module: nn.Module, tp_mesh) -> None:
    """Parameters replicated over TP as DTensors (norms without SP, learned positions), so the
    optimizer's foreach kernels never see plain tensors mixed with DTensors. Inputs and outputs
    stay plain local tensors: every TP rank computes the same full result."""
    def partition(name, mod, mesh):
        for pname, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(pname, nn.Parameter(distribute_tensor(p, mesh, [Replicate()])))

    def inputs(mod, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Replicate()], run_check=False) if isinstance(a, torch.Tensor)
                     else a for a in args)

    distribute_module(module, tp_mesh, partition, input_fn=inputs, output_fn=lambda mod, out, mesh: out.to_local())


def _shard_head_buffers(attention: nn.Module, names, tp_mesh) -> None:
    """Per-head buffers (ALiBi slopes): keep this rank's heads' entries (heads are sharded in order)."""
    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
    for name in names:
        value = getattr(attention, name, None)
        if value is not None:
            setattr(attention, name, value.chunk(size)[rank].clone())


def apply_tensor_parallel(model: nn.Module, tp_mesh, plan: ParallelPlan, sp: bool) -> bool:
    """Shard `model` (the whole model or one pipeline stage of it) over `tp_mesh`, reading its
    module names from `plan`. Returns True when the logits it produces are vocab-sharded DTensors
    (loss_parallel needed), i.e. when this part holds the head."""
    embedding, norm, head = (getattr(model, n) for n in (plan.embedding, plan.final_norm, plan.head))
    positions = getattr(model, plan.positions, None)
    styles: dict = {}
    if embedding is not None:
        styles[plan.embedding] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    if norm is not None and sp:
        styles[plan.final_norm] = SequenceParallel(use_local_output=True)
    if head is not None:
        styles[plan.head] = ColwiseParallel(input_layouts=Shard(1) if sp else Replicate(), output_layouts=Shard(-1),
                                            use_local_output=False)
    if styles:
        parallelize_module(model, tp_mesh, styles)
        if plan.tied_head:
            # Each style registers a new Parameter; both are Shard(0) over the vocabulary, so
            # the head can take the embedding's DTensor back and stay tied.
            getattr(model, plan.head).weight = getattr(model, plan.embedding).weight
    if positions is not None:
        _replicate(positions, tp_mesh)
    if norm is not None and not sp:
        _replicate(norm, tp_mesh)
    blocks = getattr(model, plan.blocks)
    keys = list(blocks.keys())
    for i, key in enumerate(keys):
        block = blocks[key]
        parallelize_module(block, tp_mesh, _block_plan(plan, sp, block))
        if _has(block, plan.moe_router):
            _replicate_used_locally(block, plan, tp_mesh, sp)
        _shard_head_buffers(getattr(block, plan.attention), plan.head_buffers, tp_mesh)
        if not sp:
            _replicate(getattr(block, plan.attention_norm), tp_mesh)
            _replicate(getattr(block, plan.ffn_norm), tp_mesh)
        if sp and i == 0:
            rest = (None,) * (BLOCK_ARGS - 1)
            parallelize_module(block, tp_mesh, PrepareModuleInput(
                input_layouts=(Replicate(), *rest), desired_input_layouts=(Shard(1), *rest), use_local_output=True))
        if sp and i == len(keys) - 1 and norm is None:
            parallelize_module(block, tp_mesh, PrepareModuleOutput(
                output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=True))
    return head is not None


def tp_collective_counts(block: nn.Module, x: torch.Tensor, rope) -> dict:
    """Collectives of one block's forward and backward, by op name (torch's CommDebugMode)."""
    from torch.distributed.tensor.debug import CommDebugMode
    counts = {}
    with CommDebugMode() as fwd:
        out = block(x, rope)
    counts["forward"] = {str(k).split(".")[-1]: v for k, v in fwd.get_comm_counts().items()}
    with CommDebugMode() as bwd:
        out.sum().backward()
    counts["backward"] = {str(k).split(".")[-1]: v for k, v in bwd.get_comm_counts().items()}
    return counts
