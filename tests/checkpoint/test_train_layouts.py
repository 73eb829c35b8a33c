"""The real trainer under parallel/'s layouts: stopped by a signal on rank 0 only, resumed under
another layout each time — FSDP x4 (async saves) -> TP 2 x FSDP 2 -> PP 2 -> one process — gives
the losses of one uninterrupted single-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch.preemption import EXIT_PREEMPTED

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests/checkpoint/train_worker.py")


def launch(nproc, run_dir, stop, out, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER]
    r = subprocess.run([*cmd, str(run_dir), str(stop), str(out), *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    return r.returncode, r.stdout + r.stderr


@pytest.mark.slow
def test_signal_stop_and_resume_across_parallel_layouts(tmp_path):
    rc, log = launch(1, tmp_path / "ref", 0, tmp_path / "ref.json")
    assert rc == 0, log[-4000:]
    want = json.loads((tmp_path / "ref.json").read_text())["loss"]

    run = tmp_path / "run"
    phases = [(4, 2, ["--parallel.dp_shard", "4", "--checkpoint.async", "true"]),
              (4, 4, ["--parallel.tp", "2", "--parallel.dp_shard", "2"]),
              (2, 6, ["--parallel.pp", "2"]),
              (1, 0, [])]
    resumed_at = 0
    for i, (nproc, stop, extra) in enumerate(phases):
        out = tmp_path / f"phase{i}.json"
        rc, log = launch(nproc, run, stop, out, *extra)
        if resumed_at:
            assert f"resumed from {run / 'checkpoints' / f'step-{resumed_at:08d}'} at step {resumed_at}" in log
        if stop:
            # torchrun reports its own failure code; the marker file carries the trainer's decision
            assert rc == (EXIT_PREEMPTED if nproc == 1 else 1), log[-4000:]
            assert f"saved step {stop}; exiting with code {EXIT_PREEMPTED}" in log
            assert json.loads((run / "PREEMPTED").read_text())["step"] == stop
            resumed_at = stop
        else:
            assert rc == 0, log[-4000:]
            assert not (run / "PREEMPTED").exists()
    got = json.loads(out.read_text())["loss"]
    assert sorted(got, key=int) == [str(s) for s in range(1, 9)]
    for step in got:
        assert abs(got[step] - want[step]) < 1e-5, (step, got[step], want[step])
