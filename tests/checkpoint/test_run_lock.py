"""One trainer per run folder: a second start is refused and names the holder; kill -9 of the
holder frees the folder (the kernel drops the lock)."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoint.helpers import run
from core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from launch.context import DistContext
from trainer.run_lock import hold_run_dir
with hold_run_dir(sys.argv[1], DistContext()):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_second_trainer_on_a_folder_is_refused_until_the_holder_dies(tmp_path):
    d = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(d)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match=rf"run.dir: .* is in use by pid {holder.pid} on "):
            run(d, "--train.steps", "2")
        assert not (d / "metrics.jsonl").exists()              # the refused trainer wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    summary, _ = run(d, "--train.steps", "2")                  # no stale lock after kill -9
    assert summary["steps"] == 2
    summary, _ = run(d, "--train.steps", "3")                  # released at the end of a run: resumes
    assert summary["steps"] == 3


def test_run_dir_that_is_a_file_is_one_clear_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ConfigError, match="run.dir: .* is a file"):
        run(f, "--train.steps", "1")
