"""The trainer CLI with one injected fault, for tests/launch/test_faults.py only:

    MESHFORMER_TEST_FAULT=kill:RANK:STEP   rank RANK kills itself with SIGKILL as step STEP begins,
                                           on the first attempt only (TORCHELASTIC_RESTART_COUNT 0);
    MESHFORMER_TEST_FAULT=stall:RANK:STEP  rank RANK sleeps (stuck, not dead) as step STEP begins.

The fault wraps the function that draws a step's batches (as tests/launch/slow_trainer.py does),
so the run is otherwise the real CLI, loader and loop, and the numbers are untouched.

    torchrun --nproc-per-node 4 -m tests.launch.fault_trainer --config FILE ...
"""
from __future__ import annotations

import os
import signal
import sys
import time


def main(argv: list[str]) -> int:
    kind, rank, step = (os.environ.get("MESHFORMER_TEST_FAULT", "") or "none:-1:0").split(":")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") in ("", "0")
    if int(rank) == int(os.environ.get("RANK", "0")) and (kind == "stall" or first_attempt):
        import trainer.train as train_mod
        take, calls = train_mod.take, [0]

        def faulty_take(it, n):
            calls[0] += 1
            if calls[0] == int(step):
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                with open(os.environ["MESHFORMER_TEST_FAULT_MARK"], "w") as f:
                    f.write(repr(time.time()))
                time.sleep(3600)
            return take(it, n)

        train_mod.take = faulty_take
    from trainer.cli import main as cli_main
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
