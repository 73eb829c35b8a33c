"""Issue 16: the loop leaves the step's loss and gradient norm on the device and reads them (and
all-reduces the loss) only at logging steps. On CPU this shows as (1) logging every 3 steps
gives exactly the numbers that logging every step gives at the shared steps, and (2) our code
reads no tensor on the host between logging steps (host_read_worker.py records every
`.item()`, `float()`, `int()`, `bool()`, `.tolist()` made from this repository's files).

Before the change the same instrumentation counted a read per step in local_engine.py
(`float(norm)`) and in the engines' reduce_loss (`loss.item()`), and under FSDP 21 more per step
in grad_norm.py (`coef.item()` per sharded gradient); the logged numbers were the same as now."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = str(ROOT / "tests/trainer/host_read_worker.py")
STEPS = 7
# grad_accum 2: the loss is a mean over micro-batches; signals are voted every 3 steps (a
# distributed run's Preemption.vote reads its flags when it votes, by design: signal_check_every)
COMMON = ["--train.steps", str(STEPS), "--train.grad_accum", "2", "--checkpoint.signal_check_every", "3"]


def launch(tmp_path, name, nproc, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, WORKER] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), WORKER]
    out = tmp_path / f"{name}.json"
    r = subprocess.run([*cmd, str(tmp_path / name), str(out), *COMMON, *extra], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return json.loads(out.read_text())


def logged(result) -> dict:
    """(step, kind) -> the logged numbers that do not depend on timing."""
    rows = {}
    for r in result["rows"]:
        kind = "val" if "val_loss" in r else "train"
        rows[(r["step"], kind)] = (r.get("loss"), r.get("grad_norm"), r.get("val_loss"), r.get("lr"))
    return rows


def check(every_step, every_3rd):
    a, b = logged(every_step), logged(every_3rd)
    shared = {k: v for k, v in a.items() if k in b}
    assert sorted(b) == [(0, "val"), (3, "train"), (6, "train"), (7, "train"), (7, "val")]
    assert shared == b                                           # exact: the same floats
    # Host reads by our code happen only where the loop reads anyway: the evaluation before
    # training (0), the logging steps (3, 6) and the last step (log, evaluation, final save).
    for result, allowed in ((every_step, set(range(STEPS + 1))), (every_3rd, {0, 3, 6, 7})):
        steps = {step for step, _ in result["reads"]}
        assert steps <= allowed, [r for r in result["reads"] if r[0] not in allowed]
    assert {step for step, _ in every_step["reads"]} == set(range(STEPS + 1))   # the instrument sees reads


def test_single_process_reads_only_at_logging_steps(tmp_path):
    check(launch(tmp_path, "l1", 1, "--metrics.log_every", "1"), launch(tmp_path, "l3", 1, "--metrics.log_every", "3"))


@pytest.mark.slow
def test_fsdp_reads_only_at_logging_steps(tmp_path):
    fsdp = ["--parallel.dp_shard", "2"]
    check(launch(tmp_path, "l1", 2, "--metrics.log_every", "1", *fsdp),
          launch(tmp_path, "l3", 2, "--metrics.log_every", "3", *fsdp))
