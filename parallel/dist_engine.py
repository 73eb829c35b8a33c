"""Engines for parallel layouts: the trainer's LocalEngine with the loss normalised over the whole
data-parallel job, DDP no_sync accumulation, vocab-parallel loss, and a global gradient norm."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor.parallel import loss_parallel

from parallel.dims import ParallelDims
from parallel.grad_norm import clip_grads_, settle_partial_grads
from parallel.local_engine import LocalEngine, full_value  # noqa: F401 (full_value: used by pipeline.py)


class DistEngine(LocalEngine):
    """LocalEngine over `model_parts` (one module unless pipelined) on a device mesh."""

    def __init__(self, model_parts: list, optimizer, scheduler, device, precision="fp32", grad_clip=0.0,
                 bf16_mode="autocast", *, dims: ParallelDims, vocab_parallel: bool = False, ddp: bool = False,
                 seq_shards: int = 1):
        super().__init__(model_parts[0], optimizer, scheduler, device, precision, grad_clip, bf16_mode)
        self.model_parts, self.dims, self.seq_shards = model_parts, dims, seq_shards
        self.vocab_parallel, self.ddp = vocab_parallel, ddp
        self.dp_size = dims.dp_size   # DDP and FSDP average gradients over these ranks

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
        """Sum over data-parallel ranks (each saw its own slice of the global batch)."""
        t = t.detach()
        if self.dims.dp_enabled:
            t = t.clone()
            dist.all_reduce(t, group=self.dims.dp_mesh.get_group())
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
