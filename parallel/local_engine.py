"""One optimizer step behind a small interface, so a pipeline schedule or a DeepSpeed engine can
take over forward/backward/step without the training loop changing."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from parallel.precision import autocast_context, post_optimizer_hook


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over all positions (in fp32 whatever the logits' dtype)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


class StepOutput(NamedTuple):
    """What one optimizer step leaves behind. The tensors stay on the device, unread: reading one
    (`.item()`, `float()`) waits for the device's queue to drain, so the loop reads them only at
    logging steps. `loss` is this rank's mean over its micro-batches; `reduce_loss` makes it the
    job's (a collective under data/pipeline parallel, taken only when the value is read)."""
    loss: torch.Tensor
    grad_norm: torch.Tensor       # global norm before clipping: the same value on every rank
    skipped: bool = False         # the update was dropped for a non-finite loss or norm (skip_nonfinite)


class LocalEngine:
    """Forward/backward over the micro-batches of one step, clip, optimizer and LR step.

    Subclasses (pipeline, DeepSpeed) override `forward_backward` and/or `clip_grad_norm`.
    """

    def __init__(self, model: nn.Module, optimizer, scheduler, device: torch.device,
                 precision: str = "fp32", grad_clip: float = 0.0, bf16_mode: str = "autocast"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.precision, self.grad_clip, self.bf16_mode = device, precision, grad_clip, bf16_mode

    def autocast(self):
        return autocast_context(self.device, self.precision, self.bf16_mode, self.model)

    def no_sync(self, last: bool):
        """Skip gradient synchronisation on all but the last micro-batch (DDP overrides)."""
        return contextlib.nullcontext()

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for i, (inputs, labels) in enumerate(batches):
            inputs, labels = inputs.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            with self.no_sync(last=i == len(batches) - 1), self.autocast():
                loss = cross_entropy(self.model(inputs), labels) / len(batches)
            loss.backward()
            total += loss.detach()
        return total

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss averaged over the whole job (single process: as is), still on the device."""
        return loss.detach()

    def all_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Whether the step's loss and gradient norm are finite on every rank: a host read."""
        return bool(torch.isfinite(loss) & torch.isfinite(norm))

    def clip_grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def train_step(self, batches, skip_nonfinite: bool = False) -> StepOutput:
        """One optimizer step over `batches` (grad accumulation), nothing read by the host.

        With `skip_nonfinite` a step whose loss or gradient norm is not finite leaves the weights
        and optimizer state as they were (AdamW's moments too), like AMP's GradScaler; deciding it
        before `optimizer.step()` costs one host read (and, distributed, one tiny all-reduce) per
        step. The LR schedule advances either way: it counts steps taken, as the loop does."""
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.forward_backward(batches)
        norm = self.clip_grad_norm()
        skipped = skip_nonfinite and not self.all_finite(loss, norm)
        if not skipped:
            self.optimizer.step()
            post_optimizer_hook(getattr(self, "model_parts", [self.model]))  # fp8 all-gather scales (torchao + FSDP)
        self.scheduler.step()
        return StepOutput(loss, norm, skipped)

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            with self.autocast():
                total += cross_entropy(self.model(inputs.to(self.device)), labels.to(self.device))
        self.model.train()
        return self.reduce_loss(total / max(1, len(batches))).item()
