"""Progress of a long fit (`sweep fit --bootstrap 200` takes minutes), a stage at a time through
core.progress: a bar on a terminal, quarter lines elsewhere; and one closing line per stage
saying how long it took."""
from __future__ import annotations

import sys
import time

from core.progress import progress

STAGES = {"starts": "L-BFGS starts", "bootstrap": "bootstrap resamples"}


class FitProgress:
    """The `progress(stage, done, total)` callback of parametric.fit_chinchilla. L-BFGS starts are
    reported from `min_starts` on (the default 64 take seconds; --all-starts' 4500 take minutes)."""

    def __init__(self, stream=None, tty: bool | None = None, min_starts: int = 100, clock=time.monotonic):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.min_starts, self.clock = min_starts, clock
        self.stage, self.bar, self.t0 = None, None, 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage == "starts" and total < self.min_starts:
            return
        if stage != self.stage or done == 0:
            self._start(stage, total)
        self.bar.update(done - self.bar.n)
        if done == total:
            self._finish(total)

    def _start(self, stage: str, total: int) -> None:
        self.stage, self.t0 = stage, self.clock()
        if not self.tty:
            self._say(f"{STAGES.get(stage, stage)}: {total} to run")
        self.bar = progress(total, STAGES.get(stage, stage), file=self.stream, tty=self.tty, leave=False,
                            clock=self.clock, prefix="fit: ")

    def _finish(self, total: int) -> None:
        self.bar.close()    # plain lines: its closing line; a bar clears itself (leave=False): say the time here
        if self.tty:
            self._say(f"{STAGES.get(self.stage, self.stage)}: {total} done in {self.clock() - self.t0:.1f} s")
        self.bar, self.stage = None, None

    def _say(self, line: str) -> None:
        print(f"fit: {line}", file=self.stream, flush=True)
