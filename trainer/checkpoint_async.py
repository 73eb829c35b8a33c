"""Writing a checkpoint in the background while training continues (DCP async_save).

A save has two phases, both off the training loop:
- staging: copy the state into CPU buffers that training does not touch. It runs on a worker
  thread while the next step's forward and backward run (they read the weights, change only
  activations and gradients); an optimizer pre-step hook makes `optimizer.step()` wait until
  the copy is done, so the checkpoint holds exactly the state of its step. The buffers are
  allocated on the first save and reused (this costs one more copy of the model and optimizer
  state in host memory for the whole run).
- writing: DCP's thread executor writes the staged copy, using its own gloo process group
  (sharing the training's group makes gloo see interleaved collectives, PLATFORM.md).

Why our own stager and not DCP's default: DCP's `StateDictStager` copies CPU storages with
`UntypedStorage.copy_`, which holds the GIL for the whole copy, so a CPU training thread stalls
for the full copy anyway (measured: a 160 MB copy in a thread made a loop of small torch ops
6x slower; `Tensor.copy_` releases the GIL and costs that loop nothing). `_GilFreeStager`
keeps all of DCP's traversal, caching and DTensor handling and only changes how a CPU storage is
copied. On an accelerator the copy is DCP's (pinned host memory, non-blocking on a side stream).
Process mode (`AsyncCheckpointerType.PROCESS`) is not used: it keeps one process-wide daemon
tied to the first process group (a second run in the same process, as in tests, would reuse a
stale one) and re-imports the entry script in a child (needs a __main__ guard in every launcher).

The commit (COMPLETE, rename, pruning old checkpoints: file-system work only, no collectives)
must follow the write, so a small thread waits for DCP's future and then commits, keeping the
rename and the deletion of old checkpoints off the training loop too. `poll()` after each step
collects a finished one; `wait()` before the next save and in `finish()` blocks until it is
done and re-raises a failed write (which is then never committed). Rank 0's future finishes only
after DCP gathered every rank's write results and wrote the metadata, so rank 0 alone commits.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))


class _GilFreeStateDictStager(StateDictStager):
    """DCP's stager (reused buffers per source storage), with CPU-to-CPU copies done by
    `Tensor.copy_` on byte views, which releases the GIL."""

    def _stage_untyped_storage(self, storage, non_blocking=False):
        if storage.device.type != "cpu":
            return super()._stage_untyped_storage(storage, non_blocking=non_blocking)
        staged = self._cached_storage_mapping.get(storage)
        if staged is None or staged.nbytes() != storage.nbytes():
            staged = torch.UntypedStorage(storage.nbytes(), device="cpu")
            self._cached_storage_mapping[storage] = staged
        _as_bytes(staged).copy_(_as_bytes(storage))
        return staged


def make_stager(device: torch.device) -> DefaultStager:
    """A stager that copies in a background thread into buffers reused across saves."""
    on_accelerator = device.type != "cpu"
    stager = DefaultStager(StagingOptions(use_pinned_memory=on_accelerator, use_shared_memory=False,
                                          use_async_staging=True, use_non_blocking_copy=on_accelerator))
    stager._state_dict_stager = _GilFreeStateDictStager(pin_memory=on_accelerator)
    return stager


class AsyncCheckpointWriter:
    def __init__(self, ctx, optimizers=()):
        self.ctx = ctx
        self.group = dist.new_group(backend="gloo") if ctx.distributed else None
        self.stager = make_stager(ctx.device)
        self._staging: Future | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._hooks = [opt.register_step_pre_hook(self._before_optimizer_step) for opt in optimizers]

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def _before_optimizer_step(self, *_) -> None:
        self.wait_for_staging()

    def wait_for_staging(self) -> None:
        """Block until the state of the last save is copied (then training may change it)."""
        staging, self._staging = self._staging, None
        if staging is not None:
            staging.result()

    def start(self, state_dict: dict, path: Path, on_done: Callable[[], None]) -> None:
        self.wait()
        if self.ctx.device.type != "cpu":
            torch.accelerator.synchronize()      # the step's kernels have written what we copy
        result = dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self.group,
                                async_stager=self.stager)
        # an AsyncSaveResponse when staging runs in the background (always with our stager)
        self._staging = getattr(result, "staging_completion", None)
        future = getattr(result, "upload_completion", result)

        def finish_then_commit():
            try:
                future.result()
                on_done()
            except BaseException as e:       # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=finish_then_commit, name="checkpoint-commit", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        if self._thread is not None and not self._thread.is_alive():
            self.wait()

    def wait(self) -> None:
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        self._staging = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self.stager.close()
            if self.group is not None:
                dist.destroy_process_group(self.group)
                self.group = None
