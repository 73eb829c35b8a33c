"""Engines for parallel layouts: the trainer's LocalEngine with data-parallel loss averaging,
DDP no_sync accumulation, vocab-parallel loss, and a global gradient norm."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from parallel.dims import ParallelDims
from parallel.grad_norm import clip_grads_, settle_partial_grads
from parallel.local_engine import LocalEngine, cross_entropy


def full_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class DistEngine(LocalEngine):
    """LocalEngine over `model_parts` (one module unless pipelined) on a device mesh."""

    def __init__(self, model_parts: list, optimizer, scheduler, device, precision="fp32", grad_clip=0.0,
                 bf16_mode="autocast", *, dims: ParallelDims, vocab_parallel: bool = False, ddp: bool = False):
        super().__init__(model_parts[0], optimizer, scheduler, device, precision, grad_clip, bf16_mode)
        self.model_parts, self.dims = model_parts, dims
        self.vocab_parallel, self.ddp = vocab_parallel, ddp

    def parameters(self):
        return [p for m in self.model_parts for p in m.parameters()]

    def loss_context(self):
        """Cross-entropy on vocab-sharded logits without gathering them (torch's loss_parallel)."""
        return loss_parallel() if self.vocab_parallel else contextlib.nullcontext()

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy(logits, labels)

    def no_sync(self, last: bool):
        if self.ddp and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def forward_backward(self, batches) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for i, (inputs, labels) in enumerate(batches):
            inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self.no_sync(last=i == len(batches) - 1), self.loss_context():
                with self.autocast():
                    loss = self.loss_fn(self.model(inputs), labels) / len(batches)
                loss.backward()
            total += full_value(loss.detach())
        return total

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Mean over data-parallel ranks (each saw its own slice of the global batch)."""
        loss = loss.detach()
        if self.dims.dp_enabled:
            loss = loss.clone()
            dist.all_reduce(loss, group=self.dims.dp_mesh.get_group())
            loss = loss / self.dims.dp_size
        return loss

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

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            with self.loss_context(), self.autocast():
                total += full_value(self.loss_fn(self.model(inputs.to(self.device)), labels.to(self.device)))
        self.model.train()
        return self.reduce_loss(total / max(1, len(batches))).item()
