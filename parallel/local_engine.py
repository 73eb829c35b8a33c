"""One optimizer step behind a small interface, so a pipeline schedule or a DeepSpeed engine can
take over forward/backward/step without the training loop changing.

The step's loss is the sum of the token losses of the whole global batch divided by the number
of labelled tokens in it (labels equal to IGNORE_INDEX, the padding at an epoch's end, count for
nothing). Every micro-batch is scaled by that one global count, so the loss and the gradients do
not depend on how a layout cuts the global batch into data-parallel ranks, accumulation steps or
pipeline microbatches, and a micro-batch without a labelled token adds 0 (a per-micro-batch mean
would be 0/0 = NaN there, and would weigh a nearly empty row as much as a full one)."""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.cross_entropy import IGNORE_INDEX, token_loss_sum  # noqa: F401 (re-exported: the engines' loss)
from parallel.precision import autocast_context, post_optimizer_hook


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the labelled positions (in fp32 whatever the logits' dtype); NaN
    when no position is labelled: the engines use `token_loss_sum` and a global count instead.
    The same sum divided by the same count as the engines' loss, so the two agree bit for bit."""
    if isinstance(logits, DTensor):     # vocab-parallel: torch's loss_parallel rule
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
    return token_loss_sum(logits, labels) / (labels != IGNORE_INDEX).sum()


def full_value(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def labelled_tokens(batches, device: torch.device) -> torch.Tensor:
    """The labelled positions of `batches`, counted on the device (int64, nothing read)."""
    count = torch.zeros((), dtype=torch.int64, device=device)
    for _, labels in batches:
        count += (labels != IGNORE_INDEX).sum()
    return count


def labelled_on_host(batches) -> bool:
    """Whether `batches` hold a labelled position, known without waiting for the device: True
    when a batch still in host memory (as the data loader hands it out, before the copy to the
    device) holds one, read through numpy; False otherwise (none there, or labels already on an
    accelerator: the caller then reads the device's count)."""
    return any(labels.device.type == "cpu" and bool((labels.detach().numpy() != IGNORE_INDEX).any())
               for _, labels in batches)


def unwrapped(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 keeps the model's own class and methods)."""
    return getattr(model, "module", model)


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """A model's auxiliary training loss of its last forward (MoE balancing), if it has one: the
    model keeps it, so the engines need not know what it is."""
    fn = getattr(unwrapped(model), "aux_loss", None)
    return fn() if fn is not None else None


def aux_weight(labels: torch.Tensor, divisor: torch.Tensor, seq_shards: int = 1) -> torch.Tensor:
    """The weight of a micro-batch's aux loss (a per-token mean over the tokens its forward saw):
    its labelled tokens over the step's divisor, like its token losses. Under sequence parallel
    each of the `seq_shards` TP ranks saw 1/seq_shards of the micro-batch's tokens and the
    gradients of their shares are summed, so each share weighs 1/seq_shards (exact for the
    z-loss, a mean over tokens; the Switch aux loss is then one per shard, parallel/README.md)."""
    w = (labels != IGNORE_INDEX).sum() / divisor
    return w / seq_shards if seq_shards > 1 else w


class StepOutput(NamedTuple):
    """What one optimizer step leaves behind. The tensors stay on the device, unread: reading one
    (`.item()`, `float()`) waits for the device's queue to drain, so the loop reads them only at
    logging steps. `loss` is this rank's share of the step's loss, scaled by the data-parallel
    size (the sum of its token losses x dp_size / the global batch's labelled tokens); `reduce_loss`
    averages it over data-parallel ranks into the job's loss (a collective, taken only when read)."""
    loss: torch.Tensor
    grad_norm: torch.Tensor       # global norm before clipping: the same value on every rank
    skipped: bool = False         # the update was dropped for a non-finite loss or norm (skip_nonfinite)
    unlabelled: bool = False      # the global batch held no labelled token: no update (loss and norm 0)


class LocalEngine:
    """Forward/backward over the micro-batches of one step, clip, optimizer and LR step.

    Subclasses (pipeline, DeepSpeed) override `forward_backward` and/or `clip_grad_norm`.
    """

    dp_size = 1   # ranks whose gradients are averaged (DDP/FSDP); the loss is scaled to undo the average
    seq_shards = 1  # ranks sharing one micro-batch's tokens (TP ranks under sequence parallel)

    def __init__(self, model: nn.Module, optimizer, scheduler, device: torch.device,
                 precision: str = "fp32", grad_clip: float = 0.0, bf16_mode: str = "autocast"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.device, self.precision, self.grad_clip, self.bf16_mode = device, precision, grad_clip, bf16_mode

    @property
    def modules(self) -> list[nn.Module]:
        return getattr(self, "model_parts", [self.model])

    def autocast(self):
        return autocast_context(self.device, self.precision, self.bf16_mode, self.model)

    def loss_context(self):
        return contextlib.nullcontext()

    def loss_fn(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return token_loss_sum(logits, labels)

    def run_model(self, inputs: torch.Tensor) -> torch.Tensor:
        """The model's forward on a micro-batch (context parallel passes the chunks' positions)."""
        return self.model(inputs)

    def no_sync(self, last: bool):
        """Skip gradient synchronisation on all but the last micro-batch (DDP overrides)."""
        return contextlib.nullcontext()

    def to_device(self, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)) for x, y in batches]

    def dp_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over data-parallel ranks (single process: as is), on the device."""
        return t.detach()

    def token_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over every rank that saw its own tokens of the step (data parallel; and tensor
        parallel under SP): a per-token count summed here counts each token once."""
        return self.dp_sum(t)

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The job's sum of a per-rank value (under pipeline parallel, the last stage's value)."""
        return self.dp_sum(t)

    def global_labelled_tokens(self, batches) -> torch.Tensor:
        """Labelled tokens in the global batch: every micro-batch of every data-parallel rank (a
        collective under data parallel, issued without a host read)."""
        return self.dp_sum(labelled_tokens(batches, self.device))

    def forward_backward(self, batches: list[tuple[torch.Tensor, torch.Tensor]], divisor: torch.Tensor) -> torch.Tensor:
        """Backward of sum(token losses) / divisor per micro-batch; returns their sum (detached)."""
        total = torch.zeros((), device=self.device)
        for i, (inputs, labels) in enumerate(batches):
            with self.no_sync(last=i == len(batches) - 1), self.loss_context():
                with self.autocast():
                    loss = self.loss_fn(self.run_model(inputs), labels) / divisor
                    aux = aux_loss(self.model)
                # A per-token mean of this micro-batch, weighted like its token losses: summed over
                # micro-batches and averaged over ranks it is the global batch's per-token mean.
                # Two roots of one backward, not loss + aux: under TP the loss is a DTensor, the aux not.
                torch.autograd.backward([loss] if aux is None else [loss, aux * aux_weight(labels, divisor, self.seq_shards)])
            total += full_value(loss.detach())      # the reported loss is the language-model loss alone
        return total

    def after_step(self) -> None:
        """The model's own bookkeeping after an update (MoE: expert loads summed over the ranks that
        saw distinct tokens, `token_sum`; bias update), if it has any."""
        for m in self.modules:
            hook = getattr(unwrapped(m), "after_step", None)
            if hook is not None:
                hook(self.token_sum)

    def reduce_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss for the whole job (the mean of the ranks' scaled shares), on the device."""
        return self.reduce_sum(loss) / self.dp_size

    def all_finite(self, loss: torch.Tensor, norm: torch.Tensor) -> bool:
        """Whether the step's loss and gradient norm are finite on every rank: a host read."""
        return bool(torch.isfinite(loss) & torch.isfinite(norm))

    def clip_grad_norm(self) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def train_step(self, batches, skip_nonfinite: bool = False) -> StepOutput:
        """One optimizer step over `batches` (grad accumulation), nothing read by the host.

        The divisor of every micro-batch's summed token loss is the global batch's labelled
        tokens / dp_size (data-parallel gradients are averaged over dp_size ranks). A global
        batch without a labelled token (an epoch's padded end) makes no update: zero gradients
        would still move AdamW's weights. Knowing that takes a host read only on a rank whose
        own rows (seen in host memory) hold no label, so all ranks decide alike: if any rank has
        a label, the global count is > 0.

        With `skip_nonfinite` a step whose loss or gradient norm is not finite leaves the weights
        and optimizer state as they were (AdamW's moments too), like AMP's GradScaler; deciding it
        before `optimizer.step()` costs one host read (and, distributed, one tiny all-reduce) per
        step. The LR schedule advances either way: it counts steps taken, as the loop does."""
        self.optimizer.zero_grad(set_to_none=True)
        labelled_here = labelled_on_host(batches)
        batches = self.to_device(batches)
        count = self.global_labelled_tokens(batches)
        divisor = count.clamp(min=1).to(torch.float32) / self.dp_size
        loss = self.forward_backward(batches, divisor)
        norm = self.clip_grad_norm()
        unlabelled = not labelled_here and not bool(count)   # the read, only where no label was seen
        skipped = not unlabelled and skip_nonfinite and not self.all_finite(loss, norm)
        if not (skipped or unlabelled):
            self.optimizer.step()
            post_optimizer_hook(self.modules)  # fp8 all-gather scales (torchao + FSDP)
        self.after_step()
        self.scheduler.step()
        return StepOutput(loss, norm, skipped, unlabelled)

    def eval_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Sum of a batch's token losses (None where this rank does not compute the loss)."""
        return full_value(self.loss_fn(self.run_model(inputs), labels))

    @torch.no_grad()
    def eval_loss(self, batches) -> float:
        """Sum of the token losses of all `batches` on all data-parallel ranks / their labelled tokens."""
        for m in self.modules:
            m.eval()
        batches = self.to_device(batches)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for inputs, labels in batches:
            with self.loss_context(), self.autocast():
                loss = self.eval_sum(inputs, labels)
            if loss is not None:
                total += loss
        for m in self.modules:
            m.train()
        total, count = self.reduce_sum(torch.stack([total, labelled_tokens(batches, self.device).double()]))
        return (total / count.clamp(min=1)).item()
