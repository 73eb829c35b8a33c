"""Writing a checkpoint in the background while training continues (DCP async_save).

`dcp.async_save` copies the state to CPU memory (staging; the only part the training loop
waits for) and writes it from a thread. Thread mode runs DCP's collectives (plan exchange,
metadata gather) concurrently with the training's own collectives, so it gets its own gloo
process group: sharing the default group makes gloo see mismatched collectives.
Process mode is not used: it re-imports the entry script in a child (needs a __main__ guard
in every launcher) and gains little when staging dominates.

The commit (COMPLETE, rename, pruning old checkpoints: file-system work only, no collectives)
must follow the write, so a small thread waits for DCP's future and then commits, keeping the
rename and the deletion of old checkpoints off the training loop too. `poll()` after each step
collects a finished one; `wait()` before the next save and in `finish()` blocks until it is
done and re-raises a failed write (which is then never committed). Rank 0's future finishes only
after DCP gathered every rank's write results and wrote the metadata, so rank 0 alone commits.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp


class AsyncCheckpointWriter:
    def __init__(self, ctx):
        self.ctx = ctx
        self.group = dist.new_group(backend="gloo") if ctx.distributed else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self._thread is not None

    def start(self, state_dict: dict, path: Path, on_done: Callable[[], None]) -> None:
        self.wait()
        result = dcp.async_save(state_dict, checkpoint_id=str(path), process_group=self.group)
        # torch >= 2.9 returns an AsyncSaveResponse when staging itself is asynchronous
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
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self.wait()
        if self.group is not None:
            dist.destroy_process_group(self.group)
            self.group = None
