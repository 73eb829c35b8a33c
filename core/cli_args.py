"""argparse with one-line errors: a bad argument raises UsageError (the CLI prints it as one
line, exit 2) instead of argparse's usage block. `--help` still prints the full usage."""
from __future__ import annotations

import argparse

from core.errors import UsageError


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are UsageError; its subparsers are ArgParsers too."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def at_least(name: str, value, low, what: str = "") -> None:
    """UsageError unless value >= low (NaN included): '--tokens: -5 must be >= 1 (new tokens)'."""
    if not value >= low:
        raise UsageError(f"{name}: {value} must be >= {low}" + (f" ({what})" if what else ""))
