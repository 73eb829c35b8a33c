"""Trains a few steps of each given shape and prints, per shape, the start-up check's estimate
beside the measured growth of peak RSS (VmHWM). Each shape runs in a child forked after the
imports: a fresh heap (a shape run after another reuses the blocks malloc kept from it) without
paying torch's import again.

  python tests/planner/rss_worker.py RUN_ROOT '[["--model.dim", "256", ...], ...]'
"""
import json
import os
import re
import sys
from pathlib import Path

import torch

from core.run_config import load_config
from launch.context import DistContext
from tests.trainer.fixtures import fixed_factory
from trainer.memory_check import check_memory
from trainer.train import train


def status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure(root: Path, i: int, extra: list[str]) -> None:
    cfg = load_config("configs/tiny.toml", [
        "--run.dir", str(root / f"run{i}"), "--train.steps", "1", "--train.eval_batches", "1",
        "--train.device", "cpu", "--train.threads", "1", "--checkpoint.every", "0",
        "--metrics.progress", "false", "--metrics.tensorboard", "false", *extra])
    est = check_memory(cfg, DistContext())
    Path("/proc/self/clear_refs").write_text("5")      # VmHWM := current RSS (Linux >= 4.0)
    base = status_kib("VmRSS")
    train(cfg, loader_factory=fixed_factory(n=2, vocab=cfg.model.vocab_size))
    grew = (status_kib("VmHWM") - base) * 1024
    print(json.dumps({"shape": extra, "grew": grew, "total": est.total, "margin": est.margin,
                      **{t: getattr(est, t) for t in est.TERMS}}), flush=True)


def main(root: Path, shapes: list[list[str]]) -> int:
    for i, extra in enumerate(shapes):
        pid = os.fork()
        if pid == 0:
            try:
                measure(root, i, extra)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        if status:
            return 1
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main(Path(sys.argv[1]), json.loads(sys.argv[2])))
