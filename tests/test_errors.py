"""One error root: every bad-input error is a MeshformerError (the CLI prints those as one line),
and keeps the base class callers caught before."""
from core.errors import MeshformerError
from data import DataError
from launch.discovery import LaunchError
from scaling.spec import SweepSpecError
from core.errors import ConfigError
from trainer.checkpoint_state import CheckpointError


def test_every_input_error_has_the_one_root_and_its_old_base():
    for cls, old_base in ((ConfigError, ValueError), (DataError, ValueError), (CheckpointError, ConfigError),
                          (LaunchError, RuntimeError), (SweepSpecError, ValueError)):
        assert issubclass(cls, MeshformerError) and issubclass(cls, old_base), cls
