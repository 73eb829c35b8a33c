"""Child for test_host_reads: the real trainer (train()) with every host read of a tensor made by
the project's own code recorded against the optimizer step it happened in.

    [torchrun --nproc_per_node N] tests/trainer/host_read_worker.py RUN_DIR OUT.json [--key value ...]

A host read is `Tensor.item()`, `float()`, `int()`, `bool()` or `.tolist()`: on a GPU each waits
for the device queue to drain. Only calls made directly from a file of this repository outside
tests/ are recorded (torch's own CPU-side bookkeeping, e.g. AdamW's step counters, is not ours
and never touches the device). Rank 0 writes {rows, reads: [[step, "file:line"], ...]}; a run
that stops on divergence writes OUT.json.rank-R holding the message on every rank and exits 1.
"""
import json
import os
import sys
from pathlib import Path

import torch

from tests.checkpoint.helpers import SMALL
from tests.trainer.fixtures import FixedBatches
from core.errors import TrainingDiverged
from core.run_config import load_config
from parallel.local_engine import LocalEngine
from trainer.train import train

ROOT = Path(__file__).resolve().parents[2]
GLOBAL_BATCH = 4
READS = ("item", "__float__", "__int__", "__bool__", "tolist")


def instrument(reads: list, step: list) -> None:
    def wrap(name):
        original = getattr(torch.Tensor, name)

        def recorded(self, *a, **kw):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(ROOT)) and "/tests/" not in caller:
                reads.append([step[0], f"{os.path.relpath(caller, ROOT)}:{sys._getframe(1).f_lineno}"])
            return original(self, *a, **kw)
        setattr(torch.Tensor, name, recorded)

    for name in READS:
        wrap(name)
    train_step = LocalEngine.train_step

    def counted(self, *a, **kw):       # every engine subclass steps through here
        step[0] += 1
        return train_step(self, *a, **kw)
    LocalEngine.train_step = counted


def main(run_dir, out, extra):
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cfg = load_config("configs/tiny.toml", SMALL + [
        "--run.dir", run_dir, "--train.batch_size", str(GLOBAL_BATCH // world), "--model.ffn_hidden", "64", *extra])

    def factory(c, *, split, seq_len, batch_size, dp_rank, dp_size, seed):
        return FixedBatches(320, seq_len, batch_size, 4, seed + (split == "val"), dp_rank, dp_size)

    reads, step = [], [0]
    instrument(reads, step)
    try:
        train(cfg, loader_factory=factory)
    except TrainingDiverged as e:
        Path(f"{out}.rank-{rank}").write_text(str(e))
        return 1
    if rank == 0:
        rows = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
        Path(out).write_text(json.dumps({"rows": rows, "reads": reads}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
