"""Progress of long work (preparing data, scanning shards, bootstrap fits): a tqdm bar on a
terminal; elsewhere (a log file, a CI log) a few whole plain lines, since a bar's carriage-return
redraws fill a file with thousands of half lines:

    scan: 25% (2 of 8 files), 4 s, about 12 s left
    ...
    scan: 8 files done in 16.0 s
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

QUARTERS = 4          # plain lines at 25, 50 and 75 %, then the closing line
PLAIN_EVERY_S = 60.0  # ... and at least once a minute on a long run


def _amount(n: float, unit: str, scale: bool) -> str:
    if scale and n >= 1e3:
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if n >= factor:
                return f"{n / factor:.1f} {prefix}{unit}"
    return f"{int(n)} {unit}".rstrip()


class PlainProgress:
    """Quarter lines with the time spent and left, then `desc: N unit done in X s` on close."""

    def __init__(self, total: float, desc: str, unit: str = "", unit_scale: bool = False, file=None,
                 clock=time.monotonic, prefix: str = ""):
        self.total, self.desc, self.unit, self.scale = total, desc, unit, unit_scale
        self.file, self.clock, self.prefix = file or sys.stderr, clock, prefix
        self.n, self.start = 0.0, clock()
        self.next_quarter, self.last_line, self.closed = 1, self.start, False

    def update(self, n: float = 1) -> None:
        self.n += n
        now = self.clock()
        if self.total and self.n >= self.total:
            return                      # the closing line says it
        quarter = int(QUARTERS * self.n / self.total) if self.total else 0
        if quarter >= self.next_quarter or now - self.last_line >= PLAIN_EVERY_S:
            self.next_quarter = max(self.next_quarter, quarter + 1)
            self._line(now)

    def _say(self, text: str) -> None:
        print(f"{self.prefix}{self.desc}: {text}", file=self.file, flush=True)

    def _line(self, now: float) -> None:
        self.last_line = now
        spent = now - self.start
        done, total = _amount(self.n, self.unit, self.scale), _amount(self.total, self.unit, self.scale)
        if not self.scale:      # "3 of 12 files"
            done = done.split()[0]
        if not self.total:
            self._say(f"{done}, {spent:.0f} s")
            return
        left = f", about {spent / self.n * (self.total - self.n):.0f} s left" if self.n else ""
        self._say(f"{100 * self.n / self.total:.0f}% ({done} of {total}), {spent:.0f} s{left}")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._say(f"{_amount(self.n, self.unit, self.scale)} done in {self.clock() - self.start:.1f} s")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:      # after an error its one line is the last word, not a progress line
            self.close()


class NoProgress(PlainProgress):
    def __init__(self):
        self.n = 0.0

    def update(self, n: float = 1) -> None:
        self.n += n

    def close(self) -> None:
        pass


def progress(total: float, desc: str, unit: str = "", *, unit_scale: bool = False, enabled: bool = True,
             file=None, tty: bool | None = None, leave: bool = True, clock=time.monotonic, prefix: str = ""):
    """A bar on a terminal (`file`, default stderr; `tty` overrides the check), plain lines
    otherwise, nothing when not enabled. `leave=False` clears the bar when it closes."""
    file = file or sys.stderr
    if not enabled:
        return NoProgress()
    if tty if tty is not None else getattr(file, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit or "it", unit_scale=unit_scale, file=file, leave=leave)
    return PlainProgress(total, desc, unit, unit_scale, file, clock, prefix)
