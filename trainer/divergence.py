"""Non-finite training: noticed without a host read per step, handled by `train.on_nonfinite`.

Each step folds "was the loss or the gradient norm not finite, and at which step first" into
tensors on the device (a few tiny kernels, nothing read). The loop reads them where it reads
anyway: at logging and evaluation steps, and before every checkpoint save, which also checks
the model and optimizer state themselves, so no save ever writes a non-finite value. A read is
one all_gather at a step every rank agrees on (log, eval and save steps are functions of the
step and of votes all ranks share), so every rank takes the same decision.

Policies: `stop` raises TrainingDiverged naming the first bad step; `skip` has the engine drop
the update (one host read per step, decided before optimizer.step) and gives up after
`train.max_skips` in a row; `rollback` reloads the newest checkpoint, keeps the data loader
where it is (the batches read since are skipped), and gives up after `train.max_rollbacks`.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from core.errors import TrainingDiverged
from core.train_config import TrainConfig
from parallel.local_engine import StepOutput

NONE = 2**62        # "no non-finite step yet"; a step number fits a float64 exactly below 2**53


class Divergence(Exception):
    """Raised between the check that finds non-finite values and the loop that applies the policy."""

    def __init__(self, step: int, loss: float, grad_norm: float, in_state: bool = False):
        super().__init__(step)
        self.step, self.loss, self.grad_norm, self.in_state = step, loss, grad_norm, in_state

    def what(self) -> str:
        """The non-finite quantities only (a finite loss of one rank is not the logged loss)."""
        if self.in_state:
            return "the model or optimizer state holds non-finite values"
        named = [f"{name} {value}" for name, value in (("loss", self.loss), ("grad norm", self.grad_norm))
                 if not math.isfinite(value)]
        return ", ".join(named) or "non-finite values"


def local_tensors_finite(tensors, device: torch.device) -> torch.Tensor:
    """One bool on `device`: every tensor (this rank's shard of a DTensor) holds finite values."""
    flags = [(t.to_local() if isinstance(t, DTensor) else t).isfinite().all().to(device)
             for t in tensors if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool, device=device)


class DivergenceGuard:
    """The device-side record of non-finite steps and the policy that acts on it."""

    def __init__(self, cfg: TrainConfig, ctx, model, optimizer):
        self.cfg, self.ctx, self.model, self.optimizer = cfg, ctx, model, optimizer
        self.first = torch.full((), NONE, dtype=torch.int64, device=ctx.device)
        self.values = torch.zeros(2, dtype=torch.float64, device=ctx.device)   # loss, grad norm at `first`
        self.checked_at = -1          # the step whose flag was last read clean
        self.skips_in_a_row = 0
        self.rollbacks = 0

    @property
    def skip_updates(self) -> bool:
        return self.cfg.on_nonfinite == "skip"

    # ---- every step, on the device ----------------------------------------------------------
    def observe(self, step: int, out: StepOutput) -> None:
        """Note a non-finite loss or norm of an applied update; count a skipped one (already read).
        A step without a labelled token (no update, loss and norm 0) changes nothing here."""
        if out.unlabelled:
            return
        if out.skipped:
            self.skips_in_a_row += 1
            if self.skips_in_a_row > self.cfg.max_skips:
                raise TrainingDiverged(
                    f"training diverged at step {step - self.skips_in_a_row + 1}: the loss or gradient norm was "
                    f"non-finite {self.skips_in_a_row} steps in a row, each update skipped (train.on_nonfinite = skip, "
                    f"train.max_skips = {self.cfg.max_skips}); the weights are those of step {step - self.skips_in_a_row}")
            return
        self.skips_in_a_row = 0
        vals = torch.stack([out.loss.detach(), out.grad_norm.detach()]).to(torch.float64)
        new = ~torch.isfinite(vals).all() & (self.first == NONE)
        self.first = torch.where(new, step, self.first)
        self.values = torch.where(new, vals, self.values)

    # ---- where the loop reads ---------------------------------------------------------------
    def check(self, step: int, *, state: bool = False) -> None:
        """Raise Divergence if a step up to `step` was non-finite on any rank (with `state`, also if
        the model or optimizer holds a non-finite value). Collective: every rank calls it at the
        same steps."""
        if step == self.checked_at and not state:
            return
        bad_state = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        if state:
            bad_state = (~local_tensors_finite(self._state_tensors(), self.ctx.device)).to(torch.float64)
        row = torch.cat([self.first.to(torch.float64).view(1), self.values, bad_state.view(1)])
        if self.ctx.distributed:
            rows = [torch.empty_like(row) for _ in range(self.ctx.world_size)]
            dist.all_gather(rows, row)
            row = torch.stack(rows)
        table = row.view(-1, 4).tolist()          # the one host read
        first, loss, norm, _ = min(table, key=lambda r: r[0])
        if first < NONE:
            raise Divergence(int(first), loss, norm)
        if any(r[3] for r in table):
            raise Divergence(step, math.nan, math.nan, in_state=True)
        self.checked_at = step

    def before_save(self, step: int) -> None:
        """CheckpointManager calls this first in every save: a non-finite state is never written."""
        self.check(step, state=True)

    def _state_tensors(self):
        yield from self.model.parameters()
        for per_param in self.optimizer.state.values():
            yield from (v for v in per_param.values() if torch.is_tensor(v))

    # ---- the policy -------------------------------------------------------------------------
    def stop_message(self, d: Divergence, last_good: Path | None, why: str = "") -> str:
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved"
        why = why or f"train.on_nonfinite = {self.cfg.on_nonfinite}"
        return f"training diverged at step {d.step}: {d.what()} ({why}); {where}"

    def recover(self, d: Divergence, ckpt) -> tuple[int, Path]:
        """Apply the policy to `d`: raise TrainingDiverged (`stop`, or `rollback` giving up), or
        roll back. Collective. Returns (the step rolled back from, the checkpoint now loaded)."""
        if self.cfg.on_nonfinite != "rollback":
            raise TrainingDiverged(self.stop_message(d, ckpt.newest()))
        if self.rollbacks >= self.cfg.max_rollbacks:
            raise TrainingDiverged(self.stop_message(
                d, ckpt.newest(), f"train.on_nonfinite = rollback: gave up after train.max_rollbacks = "
                                  f"{self.cfg.max_rollbacks}"))
        from_step = ckpt.state.step
        loaded = ckpt.roll_back()
        if loaded is None:
            raise TrainingDiverged(self.stop_message(
                d, None, "train.on_nonfinite = rollback, but there is no checkpoint to roll back to: "
                         "set checkpoint.every"))
        self.rollbacks += 1
        self.first.fill_(NONE)
        self.values.zero_()
        self.checked_at = -1
        return from_step, loaded
