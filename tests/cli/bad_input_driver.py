"""Run the bad-input table in ONE fresh interpreter, as a user would meet each case.

    python -m tests.cli.bad_input_driver WORKDIR RESULTS.json

Builds the files the cases need under WORKDIR (a few tiny shards, damaged copies, a one-step
checkpoint), then calls `trainer.cli.main(argv)` for every row with stdout and stderr captured,
catching SystemExit (argparse) and any exception that escapes (that is a traceback a user would
see). One interpreter for all rows: torch is imported once, not 60 times.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
import traceback
from pathlib import Path

from tests.cli.bad_input_cases import CASES
from tests.cli.bad_input_fixtures import build_fixtures


def run_case(argv: list[str]) -> dict:
    from trainer.cli import main
    out, err = io.StringIO(), io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as e:          # argparse, or a command that exits itself
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:            # escaped: what `python -m trainer` would print as a stack
            traceback.print_exc(file=err)
            code = 1
    return {"code": code, "out": out.getvalue(), "err": err.getvalue(),
            "seconds": round(time.perf_counter() - start, 3)}


def main(argv: list[str]) -> int:
    work, results_path = Path(argv[0]), Path(argv[1])
    only = set(argv[2:])
    paths = build_fixtures(work)
    results = {}
    for case in CASES:
        if only and case.id not in only:
            continue
        print(f"[bad-input] {case.id}", file=sys.__stderr__, flush=True)   # where a hang would be
        results[case.id] = run_case(case.argv(paths))
    results_path.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
