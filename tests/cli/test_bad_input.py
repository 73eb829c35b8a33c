"""The bad-input table (issue 17): every row gets one error line naming the key or file and what
would be right, exit code 2 (1 for a fault met while running), no stack trace, no silent accept.

All rows run in ONE fresh interpreter (tests/cli/bad_input_driver.py: torch imported once, each
row a call of `trainer.cli.main(argv)` with stdout/stderr captured); a few rows also run as real
`python -m trainer` processes, to show the driver sees what a user sees.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.cli.bad_input_cases import CASES, REPO
from tests.cli.bad_input_fixtures import build_fixtures
from tests.cli.bad_input_check import problems

COMMANDS = ("train", "prepare", "generate", "eval", "export", "plan", "slurm", "sweep", "mup")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-input")
    out = work / "results.json"
    done = subprocess.run([sys.executable, "-m", "tests.cli.bad_input_driver", str(work / "w"), str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text()), work / "w"


def test_the_table_covers_every_command_with_at_least_60_rows():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)
    for command in COMMANDS:
        assert sum(c.args[0] == command for c in CASES) >= 5, command


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_line(results, case):
    result = results[0][case.id]
    assert not problems(case, result), (problems(case, result), result["err"][-2000:])


SUBPROCESS_ROWS = ("train-threads-negative", "train-urls-empty-folder", "prepare-bad-format", "export-out-is-file",
                   "slurm-array-bad", "sweep-fit-csv-not-numbers", "generate-tokens-negative")


@pytest.mark.slow
@pytest.mark.parametrize("row", SUBPROCESS_ROWS)
def test_a_real_process_prints_what_the_driver_saw(results, row):
    """`python -m trainer ...` as a user types it: same exit code, same one line as in the driver."""
    by_id, work = results
    case = next(c for c in CASES if c.id == row)
    paths = build_fixtures(work)   # the driver's fixtures, already there: rebuilt cheaply, run kept
    done = subprocess.run([sys.executable, "-m", "trainer", *case.argv(paths)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    got = {"code": done.returncode, "out": done.stdout, "err": done.stderr}
    assert not problems(case, got), (problems(case, got), done.stderr[-2000:])
    assert done.stderr.strip().splitlines()[-1] == by_id[row]["err"].strip().splitlines()[-1]


def test_debug_shows_the_stack(tmp_path):
    done = subprocess.run([sys.executable, "-m", "trainer", "train", "--train.threads", "-2", "--debug"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" in done.stderr and "train.threads" in done.stderr


def test_prepare_counts_invalid_utf8_and_says_so(tmp_path, capsys):
    from data.prepare import main
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 au lait\n" + "already \ufffd here\n".encode() + b"\xff\xfe end\n")
    assert main([str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--workers", "1"]) == 0
    err = capsys.readouterr().err
    # three invalid bytes (\xe9, \xff, \xfe); the U+FFFD written in the file is text, not a replacement
    assert "replaced 3 invalid UTF-8 sequences with U+FFFD in 1 input files" in err and "a.txt" in err
