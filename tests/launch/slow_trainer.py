"""The trainer CLI with a pause after every step, for the preemption test only: a job must still
be training when Slurm's time-limit signal comes (about 30 s in), and sleeping (rather than a
bigger model) stretches the run without taking CPU from the other tests. The pause only applies
to the first run of a job (SLURM_RESTART_COUNT unset or 0), so the requeued run finishes fast.
The numbers are untouched: the pause wraps the function that draws the next batches.

    python -m tests.launch.slow_trainer --config FILE ...    (env MESHFORMER_TEST_STEP_SLEEP=seconds)
"""
from __future__ import annotations

import os
import sys
import time


def main(argv: list[str]) -> int:
    pause = float(os.environ.get("MESHFORMER_TEST_STEP_SLEEP", "0") or 0)
    if pause and os.environ.get("SLURM_RESTART_COUNT", "0") in ("", "0"):
        import trainer.train as train_mod
        take = train_mod.take

        def slow_take(it, n):
            time.sleep(pause)
            return take(it, n)

        train_mod.take = slow_take
    from trainer.cli import main as cli_main
    return cli_main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
