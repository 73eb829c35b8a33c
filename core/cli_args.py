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


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(the command's own arguments, the `--section.key value` config overrides). Split before
    argparse sees them: parse_known_args would take an override's value for a positional argument
    (`generate --run.dir runs/x` must not read runs/x as RUN_DIR). An override is an option whose
    name has a dot; without `=` the next word is its value, whatever it looks like (`-1`)."""
    own: list[str] = []
    overrides: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg[2:].partition("=")[0]
        if arg.startswith("--") and "." in name:
            take = 1 if "=" in arg else 2
            overrides += argv[i:i + take]
            i += take
        else:
            own.append(arg)
            i += 1
    return own, overrides
