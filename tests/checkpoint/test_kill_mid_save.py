"""A process killed in the middle of a save leaves the previous checkpoint the latest, loadable."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.checkpoint.helpers import losses, run
from trainer import checkpoint_files as files

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["no_metadata", "not_committed"])
def test_killed_save_leaves_previous_checkpoint_latest(tmp_path, mode, capsys):
    d = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(ROOT / "tests/checkpoint/kill_worker.py"), str(d), mode],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        for line in child.stdout:
            if "STALLED" in line:
                break
        else:
            pytest.fail(f"worker ended before stalling: rc={child.wait()}")
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()

    root = d / "checkpoints"
    assert [p.name for p in files.complete_checkpoints(root)] == ["step-00000001"]
    assert (root / "latest").read_text().strip() == "step-00000001"
    partial = root / ".tmp-step-00000002"
    assert partial.is_dir() and any(partial.glob("*.distcp"))     # shards were on disk
    assert (partial / ".metadata").exists() == (mode == "not_committed")

    # a new start ignores the partial save, resumes from step 1 and cleans up at its next save
    summary, rows = run(d, "--train.steps", "3", "--checkpoint.every", "1")
    out = capsys.readouterr().out
    assert f"ignoring incomplete checkpoint {partial}" in out
    assert f"resumed from {root / 'step-00000001'} at step 1" in out
    assert summary["steps"] == 3 and not partial.exists()
    assert sorted(losses(rows)) == [1, 2, 3]
