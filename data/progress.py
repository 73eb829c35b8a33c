"""Progress of long data work: a tqdm bar on a terminal; elsewhere (a log file, a CI log) a few
plain lines, since a bar's carriage-return redraws fill a file with thousands of half lines."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

QUARTERS = 4          # plain lines at 25, 50, 75 and 100 %
PLAIN_EVERY_S = 60.0  # ... and at least once a minute on a long run


def _amount(n: float, unit: str, scale: bool) -> str:
    if scale and n >= 1e3:
        for factor, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if n >= factor:
                return f"{n / factor:.1f} {prefix}{unit}"
    return f"{int(n)} {unit}"


class PlainProgress:
    """Writes `desc: 25% (12.3 MB of 49.2 MB), 4 s` lines, each a whole line."""

    def __init__(self, total: float, desc: str, unit: str, unit_scale: bool, file):
        self.total, self.desc, self.unit, self.scale, self.file = total, desc, unit, unit_scale, file
        self.n, self.start = 0.0, time.monotonic()
        self.next_quarter, self.last_line, self.shown = 1, self.start, 0.0

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        quarter = int(QUARTERS * self.n / self.total) if self.total else 0
        if quarter >= self.next_quarter or now - self.last_line >= PLAIN_EVERY_S:
            self.next_quarter = max(self.next_quarter, quarter + 1)
            self._line(now)

    def _line(self, now: float) -> None:
        self.last_line, self.shown = now, self.n
        done, total = _amount(self.n, self.unit, self.scale), _amount(self.total, self.unit, self.scale)
        if not self.scale:      # "3 of 12 files"
            done = done.split()[0]
        where = f"{100 * self.n / self.total:.0f}% ({done} of {total})" if self.total else done
        print(f"{self.desc}: {where}, {now - self.start:.0f} s", file=self.file, flush=True)

    def close(self) -> None:
        if self.n != self.shown:      # the end, unless its line is already out
            self._line(time.monotonic())

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:      # after an error its one line is the last word, not a progress line
            self.close()


class NoProgress(PlainProgress):
    def __init__(self):
        pass

    def update(self, n: float = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress(total: float, desc: str, unit: str, *, unit_scale: bool = False, enabled: bool = True, file=None):
    """A bar on a terminal (stderr), plain lines otherwise, nothing when not enabled."""
    file = file or sys.stderr
    if not enabled:
        return NoProgress()
    if getattr(file, "isatty", lambda: False)():
        return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit_scale, file=file)
    return PlainProgress(total, desc, unit, unit_scale, file)
