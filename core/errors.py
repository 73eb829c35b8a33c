"""One root for the errors a user can fix by changing their input: the CLI prints any
`MeshformerError` as one line naming the field (no stack trace; `--debug` shows it) and exits with
the error's `exit_code`: 2 for bad input found before the work starts, 1 for a fault found while
running (a damaged shard met mid-training).

Each error keeps its older base class (ValueError, or RuntimeError for launch problems) so code
that caught those still catches them; programming errors stay plain exceptions and keep their
stack traces.
"""
from __future__ import annotations

import os
import sys
from typing import Callable


class MeshformerError(Exception):
    """Bad input (a config value, a data source, a checkpoint, a launch environment, a sweep spec)."""
    exit_code = 2


class TrainingDiverged(MeshformerError, RuntimeError):
    """The loss or gradient norm stopped being finite and train.on_nonfinite gave up. A runtime
    fault, not bad input: the CLI prints the one line and exits 1."""
    exit_code = 1


class ConfigError(MeshformerError, ValueError):
    """A bad configuration value, with the dotted key and what would be right."""


class DataError(MeshformerError, ValueError):
    """A data source that cannot be read as configured (missing shards, bad manifest, ...)."""


class ShardDamageError(DataError):
    """A shard whose contents turn out damaged while reading it (token ids outside the
    vocabulary, an undecodable token array): a fault of the run, not of the command line."""
    exit_code = 1


class UsageError(MeshformerError, ValueError):
    """A command-line argument of a subcommand that cannot work (--tokens -5, --gpus 0, ...)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked: missing, incomplete, another model or layout."""


class LaunchError(MeshformerError, RuntimeError):
    """The processes cannot find each other: inconsistent launcher variables, rendezvous timeout."""


class SweepSpecError(MeshformerError, ValueError):
    """A scaling sweep spec with a bad value."""


def same_on_every_rank(e: MeshformerError) -> bool:
    """Errors of the command line and config, which every rank of a job meets alike: rank 0 alone
    prints them (torchrun would show each rank's copy of the line). Data, checkpoint and launch
    errors can be one rank's own, so every rank prints those."""
    return isinstance(e, (ConfigError, UsageError)) and not isinstance(e, CheckpointError)


# How a one-line error names its kind; the first class that matches wins (CheckpointError is a ConfigError).
# TrainingDiverged's line says what happened itself (no kind).
ERROR_KINDS = ((TrainingDiverged, ""), (ConfigError, "config error"), (DataError, "data error"), (LaunchError, "launch error"),
               (SweepSpecError, "sweep spec error"), (UsageError, "usage error"), (MeshformerError, "error"))


def error_line(prog: str, e: MeshformerError) -> str:
    """The one line a command prints for `e`: 'meshformer train: config error: optim.lr: ...'."""
    kind = next(k for cls, k in ERROR_KINDS if isinstance(e, cls))
    text = " ".join(str(e).split())      # a message with line breaks still prints as one line
    return f"{prog}: {kind}: {text}" if kind else f"{prog}: {text}"


def report_errors(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """Run a command's body; a MeshformerError becomes its one line on stderr and its exit code
    (the stack only with debug). Package commands use it so that calling their `main(argv)`
    directly answers as `meshformer <command>` does."""
    try:
        return int(body() or 0)
    except MeshformerError as e:
        if debug:
            raise
        if not (same_on_every_rank(e) and launcher_rank() > 0):
            print(error_line(prog, e), file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:          # the reader went away (`meshformer plan | head`): no traceback;
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # Python's exit flush must not raise again
        return 1                     # as the Python docs' SIGPIPE recipe does


def launcher_rank() -> int:
    """This process' global rank as its launcher set it (torchrun, srun, mpiexec); 0 alone."""
    for name in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0
