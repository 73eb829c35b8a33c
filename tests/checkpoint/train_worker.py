"""Child for test_train_layouts: the real trainer (train()) on the real data stream (the built-in
corpus through data/'s loader) under a parallel layout from parallel/, stopped by SIGUSR1 sent to
rank 0 only during step STOP (all ranks must agree, save and exit with EXIT_PREEMPTED), resuming
from whatever the run folder holds.

    torchrun --nproc_per_node N tests/checkpoint/train_worker.py RUN_DIR STOP|0 OUT.json [--parallel.* v ...]
"""
import json
import os
import signal
import sys

import data
from tests.checkpoint.helpers import SMALL
from core.run_config import load_config
from launch.preemption import EXIT_PREEMPTED
from trainer.train import train

GLOBAL_BATCH, STEPS = 4, 8


class SignalDuringStep:
    """The real training loader, sending this process SIGUSR1 when the batch of step `at` is
    taken (grad_accum is 1 here: one batch a step), as a scheduler would mid-step. The step is
    the loader's own count (steps of the current epoch: the run is far shorter than one)."""

    def __init__(self, loader, at: int):
        self.loader, self.at = loader, at

    def __iter__(self):
        for batch in self.loader:
            if self.loader.steps == self.at:
                os.kill(os.getpid(), signal.SIGUSR1)
            yield batch

    def state_dict(self):
        return self.loader.state_dict()

    def load_state_dict(self, d):
        self.loader.load_state_dict(d)


def main(run_dir, stop, out, extra):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    vals = dict(zip(extra[::2], extra[1::2]))
    dp = world // (int(vals.get("--parallel.pp", 1)) * int(vals.get("--parallel.tp", 1)))
    cfg = load_config("configs/tiny.toml", SMALL + [
        "--run.dir", run_dir, "--train.steps", str(STEPS), "--train.batch_size", str(GLOBAL_BATCH // dp),
        "--model.ffn_hidden", "64", *extra])

    def factory(c, *, split, **kw):
        loader = data.build_loader(c, split=split, **kw)
        if split == "train" and stop and rank == 0:
            return SignalDuringStep(loader, stop)
        return loader

    summary = train(cfg, loader_factory=factory)
    if rank == 0:
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        with open(out, "w") as f:
            json.dump({"summary": summary, "loss": {r["step"]: r["loss"] for r in rows if "loss" in r}}, f)
    return EXIT_PREEMPTED if summary["preempted"] else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
