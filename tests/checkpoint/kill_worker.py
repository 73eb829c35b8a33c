"""Child process for test_kill_mid_save: trains 2 steps saving every step, and stalls the second
save at a chosen point (printing STALLED) so the parent can SIGKILL it there.

    python tests/checkpoint/kill_worker.py RUN_DIR no_metadata|not_committed
"""
import sys
import time
import types

import torch.distributed.checkpoint as dcp

import trainer.checkpoint as ck
from tests.checkpoint.helpers import config, factory
from trainer.train import train


def stall():
    print("STALLED", flush=True)
    time.sleep(600)


class StallingWriter(dcp.FileSystemWriter):
    """Writes every shard, then stalls before DCP writes its .metadata."""

    def finish(self, metadata, results):
        stall()


def main(run_dir: str, mode: str) -> None:
    saves = {"n": 0}

    def save(sd, storage_writer):
        saves["n"] += 1
        if saves["n"] == 2 and mode == "no_metadata":
            return dcp.save(sd, storage_writer=StallingWriter(storage_writer.path))
        return dcp.save(sd, storage_writer=storage_writer)

    real_commit = ck.files.commit

    def commit(tmp, final):
        if saves["n"] == 2 and mode == "not_committed":
            stall()
        real_commit(tmp, final)

    ck.dcp = types.SimpleNamespace(save=save)
    ck.files.commit = commit
    train(config(run_dir, "--train.steps", "2", "--checkpoint.every", "1"), loader_factory=factory())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
