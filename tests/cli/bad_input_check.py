"""What a row must show, shared by the table test and by hand: `python -m tests.cli.bad_input_check RESULTS.json`."""
from __future__ import annotations

import json
import re
import sys

from tests.cli.bad_input_cases import CASES


def problems(case, result: dict) -> list[str]:
    """Everything wrong with how the CLI answered one row (empty = as promised): a traceback, an
    exit code other than the row's, or not exactly one error line ('meshformer ...: ...'), the last
    line on stderr, matching the row's regex. Warnings logged before the error may precede it."""
    lines = [line for line in result["err"].splitlines() if line.strip()]
    err_lines = [line for line in lines if line.startswith("meshformer")]
    found = []
    if "Traceback" in result["err"] or "Traceback" in result["out"]:
        found.append("a traceback")
    if result["code"] == 0:
        found.append("silently accepted (exit 0)")
    elif result["code"] != case.code:
        found.append(f"exit code {result['code']}, expected {case.code}")
    if len(err_lines) != 1:
        found.append(f"{len(err_lines)} error lines on stderr, expected exactly one")
    elif err_lines[0] != lines[-1]:
        found.append("the error line is not the last line on stderr")
    elif not re.search(case.match, err_lines[0]):
        found.append(f"the line does not match {case.match!r}")
    return found


def main(path: str) -> int:
    results = json.loads(open(path).read())
    bad = 0
    for case in CASES:
        if case.id not in results:
            continue
        r = results[case.id]
        found = problems(case, r)
        bad += bool(found)
        mark = "FAIL" if found else "ok  "
        tail = r["err"].strip().splitlines()[-1:] or r["out"].strip().splitlines()[-1:] or [""]
        print(f"{mark} {case.id:34s} rc={r['code']} {r['seconds']:6.2f}s {'; '.join(found)}\n      {tail[0][:220]}")
    print(f"{bad} of {len(results)} rows fail")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
