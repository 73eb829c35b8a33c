"""One root for the errors a user can fix by changing their input: the CLI prints any
`MeshformerError` as one line naming the field (no stack trace) and exits with code 2.

Each error keeps its older base class (ValueError, or RuntimeError for launch problems) so code
that caught those still catches them; programming errors stay plain exceptions and keep their
stack traces.
"""
from __future__ import annotations


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


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked: missing, incomplete, another model or layout."""


class LaunchError(MeshformerError, RuntimeError):
    """The processes cannot find each other: inconsistent launcher variables, rendezvous timeout."""


class SweepSpecError(MeshformerError, ValueError):
    """A scaling sweep spec with a bad value."""
