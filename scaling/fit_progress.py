"""Progress of a long fit (`sweep fit --bootstrap 200` takes minutes): a tqdm bar per stage on a
terminal; elsewhere (a log file, a CI job) a few plain lines, at each quarter, with the time left;
and one closing line per stage saying how long it took."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

STAGES = {"starts": "L-BFGS starts", "bootstrap": "bootstrap resamples"}


class FitProgress:
    """The `progress(stage, done, total)` callback of parametric.fit_chinchilla. L-BFGS starts are
    reported from `min_starts` on (the default 64 take seconds; --all-starts' 4500 take minutes)."""

    def __init__(self, stream=None, tty: bool | None = None, min_starts: int = 100, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_starts, self.clock = min_starts, clock
        self.stage, self.bar, self.t0, self.marks = None, None, 0.0, []

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "starts" and total < self.min_starts:
            return
        if stage != self.stage or done == 0:
            self._start(stage, total)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
        elif self.marks and done >= self.marks[0]:
            while self.marks and done >= self.marks[0]:
                self.marks.pop(0)
            spent = self.clock() - self.t0
            left = spent / done * (total - done)
            self._say(f"{STAGES.get(stage, stage)}: {done}/{total}, {spent:.0f} s"
                      + (f", about {left:.0f} s left" if done < total else ""))
        if done == total:
            self._finish(total)

    def _start(self, stage: str, total: int) -> None:
        self.stage, self.t0 = stage, self.clock()
        if self.tty:
            self.bar = tqdm(total=total, desc=STAGES.get(stage, stage), file=self.stream, leave=False)
        else:
            self.marks = [max(1, total * q // 4) for q in (1, 2, 3)]
            self._say(f"{STAGES.get(stage, stage)}: {total} to run")

    def _finish(self, total: int) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._say(f"{STAGES.get(self.stage, self.stage)}: {total} done in {self.clock() - self.t0:.1f} s")
        self.stage = None

    def _say(self, line: str) -> None:
        print(f"fit: {line}", file=self.stream, flush=True)
