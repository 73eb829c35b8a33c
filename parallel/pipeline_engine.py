"""The engine step under pipeline parallel: the schedule runs forward and backward of all
microbatches; the loss, known on the last stage, is shared with the other stages."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.dist_engine import DistEngine
from parallel.pipeline import PipelineSetup


class PipelineEngine(DistEngine):
    """The step is the schedule's: forward and backward of all microbatches interleaved."""

    def __init__(self, *args, pipeline: PipelineSetup, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def forward_backward(self, batches) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            with self.loss_context(), self.autocast():
                loss = self.pipeline.run(inputs.to(self.device), labels.to(self.device), accumulation=len(batches))
            if loss is not None:
                total += loss
        return total

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The last stage's loss, sent to the other stages, then averaged over data parallel."""
        group = self.dims.pp_mesh.get_group()
        loss = loss.detach().clone()
        dist.broadcast(loss, src=dist.get_global_rank(group, self.dims.pp - 1), group=group)
        return super().reduce_loss(loss)

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        for m in self.model_parts:
            m.eval()
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            with self.loss_context(), self.autocast():
                loss = self.pipeline.run(inputs.to(self.device), labels.to(self.device), train=False)
            if loss is not None:
                total += loss
        for m in self.model_parts:
            m.train()
        return self.reduce_loss(total / max(1, len(batches))).item()
