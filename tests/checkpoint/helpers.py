"""Small training runs for checkpoint tests (single process, fp32 CPU, deterministic batches)."""
from __future__ import annotations

import json
import os
import signal

from tests.trainer.fixtures import FixedBatches
from core.run_config import load_config
from trainer import checkpoint_files as files
from trainer.train import train

SMALL = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
         "--train.seq_len", "16", "--train.batch_size", "4", "--metrics.progress", "false",
         "--metrics.tensorboard", "false", "--optim.warmup_steps", "2", "--train.eval_batches", "1",
         "--train.eval_every", "0", "--metrics.log_every", "1", "--checkpoint.every", "0", "--train.threads", "1"]


class SignalAt(FixedBatches):
    """Batches that send this process `sig` when batch number `at` is taken (i.e. during step
    `at`), as a scheduler would in the middle of a step."""

    def __init__(self, *a, at: int, sig=signal.SIGUSR1, **kw):
        super().__init__(*a, **kw)
        self.at, self.sig = at, sig

    def __iter__(self):
        for b in super().__iter__():
            if self.pos == self.at:
                os.kill(os.getpid(), self.sig)
            yield b


def factory(n=6, signal_at=None, sig=signal.SIGUSR1):
    def make(cfg, *, split, seq_len, batch_size, dp_rank, dp_size, seed):
        args = (320, seq_len, batch_size, n, seed + (split == "val"), dp_rank, dp_size)
        if split == "train" and signal_at is not None:
            return SignalAt(*args, at=signal_at, sig=sig)
        return FixedBatches(*args)
    return make


def config(run_dir, *extra):
    return load_config("configs/tiny.toml", SMALL + ["--run.dir", str(run_dir), *extra])


def run(run_dir, *extra, signal_at=None, sig=signal.SIGUSR1):
    summary = train(config(run_dir, *extra), loader_factory=factory(signal_at=signal_at, sig=sig))
    return summary, metrics(run_dir)


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(rows) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def lrs(rows) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in rows if "lr" in r}


def forge_checksums(ckpt) -> None:
    """Record the checksums of a single-process checkpoint's files as they are now: what someone
    who edits a checkpoint on purpose (a test's crafted file, an attacker) would also do, so the
    load gets past the damage check to the checks behind it."""
    for old in ckpt.glob("checksums-*.json"):
        old.unlink()
    names = [p.name for p in ckpt.iterdir() if p.name not in (files.COMPLETE, ".metadata")]
    files.write_checksums(ckpt, files.CHECKSUMS_RANK.format(0), names)
    files.write_checksums(ckpt, files.CHECKSUMS_METADATA, [".metadata"], extra={"world_size": 1})
