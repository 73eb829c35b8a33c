"""Child for test_train_layouts: the real trainer (train()) under a parallel layout from
parallel/, stopped by SIGUSR1 sent to rank 0 only during step STOP (all ranks must agree, save
and exit with EXIT_PREEMPTED), resuming from whatever the run folder holds.

    torchrun --nproc_per_node N tests/checkpoint/train_worker.py RUN_DIR STOP|0 OUT.json [--parallel.* v ...]
"""
import json
import os
import signal
import sys

from tests.checkpoint.helpers import SMALL, SignalAt
from tests.trainer.fixtures import FixedBatches
from core.run_config import load_config
from launch.preemption import EXIT_PREEMPTED
from trainer.train import train

GLOBAL_BATCH, STEPS = 4, 8


def main(run_dir, stop, out, extra):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    vals = dict(zip(extra[::2], extra[1::2]))
    dp = world // (int(vals.get("--parallel.pp", 1)) * int(vals.get("--parallel.tp", 1)))
    cfg = load_config("configs/tiny.toml", SMALL + [
        "--run.dir", run_dir, "--train.steps", str(STEPS), "--train.batch_size", str(GLOBAL_BATCH // dp),
        "--model.ffn_hidden", "64", *extra])

    def factory(c, *, split, seq_len, batch_size, dp_rank, dp_size, seed):
        args = (320, seq_len, batch_size, 4, seed + (split == "val"), dp_rank, dp_size)
        if split == "train" and stop and rank == 0:
            return SignalAt(*args, at=stop, sig=signal.SIGUSR1)
        return FixedBatches(*args)

    summary = train(cfg, loader_factory=factory)
    if rank == 0:
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        with open(out, "w") as f:
            json.dump({"summary": summary, "loss": {r["step"]: r["loss"] for r in rows if "loss" in r}}, f)
    return EXIT_PREEMPTED if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
