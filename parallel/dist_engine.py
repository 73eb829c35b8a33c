"""Engines for parallel layouts: the trainer's LocalEngine with the loss normalised over the whole
data-parallel job, DDP no_sync accumulation, vocab-parallel loss, a global gradient norm, and the
context-parallel cut of each micro-batch (this cp rank's chunks of every row, labels alike)."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from parallel.context import zigzag_index
from parallel.dims import ParallelDims
from parallel.grad_norm import clip_grads_, settle_partial_grads
from parallel.local_engine import LocalEngine, full_value, unwrapped  # noqa: F401 (full_value: used by pipeline.py)


class CPChunk(NamedTuple):
    """A context-parallel rank's part of a micro-batch's inputs, with what the model needs to
    place its tokens in their rows."""
    tokens: torch.Tensor           # [B, T/cp]: chunks r and 2cp-1-r of every row
    positions: torch.Tensor        # [T/cp] or, under doc masking, [B, T/cp]
    doc: torch.Tensor | None       # [B, T/cp] document ids under doc masking


class DistEngine(LocalEngine):
    """LocalEngine over `model_parts` (one module unless pipelined) on a device mesh."""

    def __init__(self, model_parts: list, optimizer, scheduler, device, precision="fp32", grad_clip=0.0,
                 bf16_mode="autocast", *, dims: ParallelDims, vocab_parallel: bool = False, ddp: bool = False,
                 seq_shards: int = 1):
        super().__init__(model_parts[0], optimizer, scheduler, device, precision, grad_clip, bf16_mode)
        self.model_parts, self.dims, self.seq_shards = model_parts, dims, seq_shards
        self.vocab_parallel, self.ddp = vocab_parallel, ddp
        # DDP and FSDP average gradients over these ranks: data parallel x context parallel (the cp
        # ranks' losses are parts of one sum over each row's tokens, each labelled token once)
        self.dp_size = dims.grad_reduce_size

    def to_device(self, batches):
        """Under context parallel: this cp rank's zigzag chunks of every row (inputs and labels
        alike, so each label stays with its input) with the chunks' positions and document ids,
        which the model gives the whole row (doc masking numbers a row's documents from its start)."""
        batches = super().to_device(batches)
        if not self.dims.cp_enabled:
            return batches
        out = []
        for x, y in batches:
            idx = zigzag_index(x.shape[1], self.dims.cp, self.dims.cp_rank, self.device)
            pos, doc = unwrapped(self.model).row_positions(x)
            chunk = CPChunk(x.index_select(1, idx), pos.index_select(-1, idx),
                            None if doc is None else doc.index_select(-1, idx))
            out.append((chunk, y.index_select(1, idx)))
        return out

    def run_model(self, inputs) -> torch.Tensor:
        if isinstance(inputs, CPChunk):
            return self.model(inputs.tokens, positions=inputs.positions, doc=inputs.doc)
        return self.model(inputs)

    def parameters(self):
        return [p for m in self.model_parts for p in m.parameters()]

    def loss_context(self):
        """Cross-entropy on vocab-sharded logits without gathering them (torch's loss_parallel)."""
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    def no_sync(self, last: bool):
        if self.ddp and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel (x context-parallel) ranks (each saw its own slice of the global batch)."""
        t = t.detach()
        if self.dp_size > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.dims.dp_cp_mesh.get_group())
        return t

    def token_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Over data parallel, then over TP where sequence parallel gave each TP rank its own tokens."""
        t = self.dp_sum(t)
        if self.seq_shards > 1:
            t = t.clone()
            dist.all_reduce(t, group=self.dims.tp_mesh.get_group())
        return t

    def all_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Every rank's verdict, so all of them drop the same updates (under pipeline parallel
        only the last stage holds a loss)."""
        finite = (torch.isfinite(loss) & torch.isfinite(norm)).to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def clip_grad_norm(self) -> torch.Tensor:
        params = self.parameters()
        settle_partial_grads(params)
        pp_group = self.dims.pp_mesh.get_group() if self.dims.pp_enabled else None
        return clip_grads_(params, self.grad_clip, pp_group)
