"""One trainer per run folder: rank 0 holds an exclusive lock on `run.dir/.lock` for the whole run.

Two trainers on one folder would both resume, both write checkpoints and interleave
metrics.jsonl. `fcntl.flock` is released by the kernel when the process dies (kill -9 included),
so a crash never leaves a stale lock; the file's text only says who holds it. On network file
systems flock needs the file system's lock support (NFSv4, Lustre with `-o flock`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.errors import ConfigError

LOCK_NAME = ".lock"


def _open_run_dir(run_dir: Path):
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {str(run_dir)!r} is a file; give a folder (it is created if missing)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return open(run_dir / LOCK_NAME, "a+")
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write in {str(run_dir)!r} ({e.strerror}); give a writable folder") from None


def _holder(f) -> str:
    f.seek(0)
    try:
        h = json.loads(f.read())
        return f"pid {h['pid']} on {h['host']} since {h['started']}"
    except (ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, ctx):
    """Rank 0 takes the folder's lock for the duration; every rank raises if it is held elsewhere."""
    run_dir = Path(run_dir)
    f, problem = None, None
    if ctx.is_main:
        f = _open_run_dir(run_dir)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            problem = f"run.dir: {str(run_dir)!r} is in use by {_holder(f)} (another trainer); wait for it, stop it, " \
                      "or give this run another run.dir"
            f.close()
            f = None
        else:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "world_size": ctx.world_size}))
            f.flush()
    if ctx.distributed:                 # all ranks learn whether rank 0 got the folder
        refused = torch.tensor([float(problem is not None)])
        dist.all_reduce(refused, op=dist.ReduceOp.MAX)
        if refused.item() and problem is None:
            problem = f"run.dir: {str(run_dir)!r} is in use by another trainer (rank 0 could not lock it)"
    if problem:
        raise ConfigError(problem)
    try:
        yield
    finally:
        if f is not None:
            fcntl.flock(f, fcntl.LOCK_UN)
            f.close()
