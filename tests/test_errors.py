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


def test_a_config_error_is_printed_by_rank_0_alone(monkeypatch, capsys):
    """Under torchrun every rank meets the same config error: one line, not one per rank. A data
    error may be one rank's own, so every rank prints it. All ranks exit 2."""
    from core.errors import ConfigError, DataError, report_errors

    def fail(error):
        def body():
            raise error
        return body
    for rank, error, printed in (("0", ConfigError("model.x: bad"), True), ("1", ConfigError("model.x: bad"), False),
                                 ("1", DataError("shard y: bad"), True)):
        monkeypatch.setenv("RANK", rank)
        assert report_errors("meshformer train", fail(error)) == 2
        assert bool(capsys.readouterr().err) == printed, (rank, error)


def test_a_closed_pipe_ends_quietly():
    """`meshformer plan | head`: the reader goes away; no BrokenPipeError traceback (exit 1)."""
    import subprocess
    import sys
    from pathlib import Path
    body = ("import sys; from core.errors import report_errors; "
            "sys.exit(report_errors('meshformer x', lambda: [print('line ' * 1000) for _ in range(10000)]))")
    done = subprocess.run(f"{sys.executable} -c \"{body}\" | head -c 10", shell=True, capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=60,
                          executable="/bin/bash")
    assert done.stdout == "line line " and done.stderr == ""
