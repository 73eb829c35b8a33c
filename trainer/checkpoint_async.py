"""Writing a checkpoint in the background while training continues.

The training loop pays only for taking the state dicts (references, no copies) and starting
the save. The rest runs off the loop:
- staging: copy the state into CPU buffers that training does not touch. It runs on the
  stager's worker thread while the next step's forward and backward run (they read the
  weights, change only activations and gradients); an optimizer pre-step hook makes
  `optimizer.step()` wait until the copy is done, so the checkpoint holds exactly the state of
  its step. The buffers are allocated on the first save and reused: one more copy of the model
  and optimizer state in host memory for the whole run.
- writing, on one background thread per save, at a lower CPU priority than training: this
  rank's JSON records, then `dcp.save` of the staged copy (own gloo process group: sharing the
  training's group makes gloo see interleaved collectives: parallel/README.md, Platform notes), then the commit
  (COMPLETE, rename, pruning: rank 0 only; DCP's save returns on rank 0 after every rank wrote
  its shards, and every rank wrote its JSON before its shards).

This is what `dcp.async_save` in thread mode does (a thread that waits for staging and calls
`dcp.save`), done on our thread so that it can run at low priority and write the JSON records
and commit in order. DCP's process mode is not used: it keeps one process-wide daemon tied to
the first process group (a second run in the same process, as in tests, would reuse a stale
one), re-imports the entry script in a child, and measured no better here.

Why our own stager copy: DCP's `StateDictStager` copies CPU storages with
`UntypedStorage.copy_`, which holds the GIL for the whole copy, so a CPU training thread stalls
for the full copy anyway (measured: a 160 MB copy in a thread made a loop of small torch ops
6x slower; `Tensor.copy_` releases the GIL and costs that loop nothing). `_GilFreeStateDictStager`
keeps all of DCP's traversal, caching and DTensor handling and only changes how a CPU storage
is copied. On an accelerator the copy is DCP's (pinned host memory, non-blocking, side stream).

`poll()` after each step collects a finished save; `wait()` before the next save and in
`close()` blocks until it is done and re-raises a failure (a failed save is never committed).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._state_dict_stager import StateDictStager
from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

from trainer.checkpoint_state import CheckpointWriter, single_process_quiet

WRITER_NICENESS = 10


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
    if hasattr(stager, "_state_dict_stager") and hasattr(StateDictStager, "_stage_untyped_storage"):
        stager._state_dict_stager = _GilFreeStateDictStager(pin_memory=on_accelerator)
    # else: a torch whose private staging layout changed: DCP's own copy (correct, holds the GIL)
    return stager


def _lower_this_threads_priority() -> None:
    """Let training threads win when the writer competes with them for a core (Linux: nice is
    per thread). Best effort: other systems keep the normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError):
        pass


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

    def start(self, state_dict: dict, path: Path, *, before_write: Callable[[], None] = lambda: None,
              records=(), on_done: Callable[[], None]) -> None:
        """Stage `state_dict`, then on the writer thread: before_write() (this rank's JSON `records`),
        the DCP write with checksums of the shards and records, on_done() (the commit)."""
        self.wait()
        if self.ctx.device.type != "cpu":
            torch.accelerator.synchronize()      # the step's kernels have written what we copy
        staging = self.stager.stage(state_dict)
        self._staging = staging

        def write_then_commit():
            _lower_this_threads_priority()
            try:
                staged = staging.result()
                before_write()
                with single_process_quiet():
                    writer = CheckpointWriter(str(path), rank=self.ctx.rank, world_size=self.ctx.world_size,
                                              records=records)
                    dcp.save(staged, storage_writer=writer, process_group=self.group)
                on_done()
            except BaseException as e:       # handed to the training thread by wait()
                self._error = e

        self._thread = threading.Thread(target=write_then_commit, name="checkpoint-writer", daemon=True)
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
