"""The layering contract in pyproject.toml ([tool.importlinter]) holds, and it can fail.

import-linter checks the import graph statically: imports run downward only (bench > trainer >
data | parallel | launch | scaling > core), the middle packages do not import each other, core
imports no torch, and no package's modules import each other in a circle.
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "data", "parallel", "launch", "scaling", "trainer", "bench")
# click's command parses sys.argv; --no-cache: no .import_linter_cache folder left behind
LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())",
        "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH=root: the graph is built from this tree, whatever else is installed
    return subprocess.run(LINT, cwd=root, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_contracts_hold():
    done = lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 kept, 0 broken" in done.stdout


@pytest.fixture
def tree(tmp_path):
    """A copy of the packages and pyproject.toml to break."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def _add_line(path: Path, line: str) -> None:
    text = path.read_text()
    head, sep, rest = text.partition("from __future__ import annotations\n")
    path.write_text(head + sep + line + "\n" + rest if sep else line + "\n" + text)


@pytest.mark.parametrize("file, line, broken", [
    ("core/errors.py", "import trainer.train", "Imports run downward"),              # upward from the ground
    ("data/loader.py", "import trainer.cli", "Imports run downward"),                # upward from the middle
    ("launch/slurm_submit.py", "import parallel.dims", "do not import each other"),  # sideways
    ("core/layout.py", "import torch", "no torch"),
    ("data/shards.py", "from . import sources", "No import circles"),               # shards <-> sources
])
def test_a_broken_contract_is_reported(tree, file, line, broken):
    _add_line(tree / file, line)
    done = lint(tree)
    assert done.returncode != 0, done.stdout
    assert "BROKEN" in done.stdout
    assert verdict(done.stdout, broken) == "BROKEN", done.stdout


def verdict(report: str, contract: str) -> str:
    """KEPT or BROKEN, as the report says for the contract whose name contains `contract` (a
    long name wraps onto the next line, so take the first verdict word after it)."""
    start = report.index(contract)
    kept, broken = report.find("KEPT", start), report.find("BROKEN", start)
    return "BROKEN" if broken >= 0 and (kept < 0 or broken < kept) else "KEPT"
