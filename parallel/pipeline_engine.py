"""The engine step under pipeline parallel: the schedule runs forward and backward of all
microbatches; the loss, known on the last stage, is shared with the other stages."""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.dist_engine import DistEngine
from parallel.pipeline import PipelineSetup


class PipelineEngine(DistEngine):
    """The step is the schedule's: forward and backward of all microbatches interleaved. Every
    stage holds the labels (the loader gives pipeline peers the same batches), so every stage
    counts the labelled tokens and takes the same decisions; only the last computes the loss."""

    def __init__(self, *args, pipeline: PipelineSetup, **kwargs):
        super().__init__(*args, **kwargs)
        self.pipeline = pipeline

    def forward_backward(self, batches, divisor: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            with self.loss_context(), self.autocast():
                loss = self.pipeline.run(inputs, labels, divisor=divisor)
            if loss is not None:
                total += loss
        return total

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The last stage's value, sent to the other stages, then summed over data parallel."""
        group = self.dims.pp_mesh.get_group()
        t = t.detach().clone()
        dist.broadcast(t, src=dist.get_global_rank(group, self.dims.pp - 1), group=group)
        return self.dp_sum(t)

    def eval_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        return self.pipeline.run(inputs, labels, train=False)
