"""Writing a checkpoint in the background while training continues (DCP async_save).

`dcp.async_save` copies the state to CPU memory (staging; the only part the training loop
waits for) and writes it from a thread. Thread mode runs DCP's collectives (plan exchange,
metadata gather) concurrently with the training's own collectives, so it gets its own gloo
process group: sharing the default group makes gloo see mismatched collectives.
Process mode is not used: it re-imports the entry script in a child (needs a __main__ guard
in every launcher) and gains little when staging dominates.

The commit (rename + COMPLETE) must wait for the write: `poll()` after each step commits a
finished write; `wait()` before the next save and in `finish()` blocks until it is done.
Rank 0's future finishes only after DCP gathered every rank's write results and wrote the
metadata, so rank 0 alone can commit.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp


class AsyncCheckpointWriter:
    def __init__(self, ctx):
        self.ctx = ctx
        self.group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._future = None
        self._on_done: Callable[[], None] | None = None

    @property
    def pending(self) -> bool:
        return self._future is not None

    def start(self, state_dict: dict, path: Path, on_done: Callable[[], None]) -> None:
        self.wait()
        result = dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self.group)
        # torch >= 2.9 returns an AsyncSaveResponse when staging itself is asynchronous
        self._future = getattr(result, "upload_completion", result)
        self._on_done = on_done

    def poll(self) -> None:
        if self._future is not None and self._future.done():
            self.wait()

    def wait(self) -> None:
        if self._future is None:
            return
        future, on_done = self._future, self._on_done
        self._future, self._on_done = None, None
        future.result()          # re-raises a failed write: the checkpoint is then never committed
        on_done()

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
