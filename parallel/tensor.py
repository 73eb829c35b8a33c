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
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from core.parallel_plan import ParallelPlan

BLOCK_ARGS = 6          # TransformerBlock.forward / Attention.forward: (x, rope, start_pos, cache, positions, doc)


def _block_plan(plan: ParallelPlan, sp: bool) -> dict:
    seq = Shard(1) if sp else Replicate()
    styles: dict = {name: ColwiseParallel() for name in plan.colwise}
    styles.update({name: RowwiseParallel(output_layouts=seq) for name in plan.rowwise})
    rest = (None,) * (BLOCK_ARGS - 1)
    # One entry point per half-block (Megatron's "f"/"g"): q/k/v (and w1/w3) take the same
    # DTensor input, so backward sums their input gradients before one all-reduce (or one
    # reduce-scatter under SP) instead of one per projection.
    styles.update({
        plan.attention: PrepareModuleInput(input_layouts=(seq, *rest), desired_input_layouts=(Replicate(), *rest)),
        plan.feed_forward: PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
    })
    if sp:
        # Local outputs: the residual stream is plain local [B, T/tp, D] tensors, so adding
        # it works for pre- and post-norm blocks alike.
        styles[plan.attention_norm] = SequenceParallel(use_local_output=True)
        styles[plan.ffn_norm] = SequenceParallel(use_local_output=True)
    return styles


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
        parallelize_module(block, tp_mesh, _block_plan(plan, sp))
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
