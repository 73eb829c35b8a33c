import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from scaling.spec import load_spec
from scaling.store import ResultsStore
from trainer.cli import main as meshformer

from .helpers import REPO, write_spec
from .local_slurm import LocalSlurm, why_not


def main(argv):
    """`meshformer sweep ...`: job arrays need the launcher layer that trainer/ wires in."""
    return meshformer(["sweep", *argv])


@pytest.fixture(scope="module")
def slurm():
    reason = why_not()
    if reason:
        pytest.skip(reason)
    d = Path(tempfile.mkdtemp(prefix="sweep-slurm-"))   # not under pytest's 0700 folder: munged must reach it
    s = LocalSlurm(d)
    try:
        s.start()
    except BaseException:
        s.stop()
        raise
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(s.conf)
    yield s
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old
    s.stop()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_sweep_as_slurm_job_arrays(slurm, tmp_path, capsys):
    spec_path = write_spec(tmp_path, replace={"compare_from_scratch = true": "compare_from_scratch = false"})
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    out = capsys.readouterr().out
    assert "submitted stage 0: 4 runs" in out and "submitted stage 1: 12 runs" in out
    script = (spec.out_dir / "slurm" / "array-stage1.sbatch").read_text()
    assert "#SBATCH --array=0-11%2" in script
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == 16 and all(r["status"] == "done" for r in rows), \
        [(r["run_id"], r["status"], r["error"]) for r in rows if r["status"] != "done"]
    jobs = {r["slurm_job"].split("_")[0] for r in rows}
    assert len(jobs) == 2 and all(r["slurm_job"].split("_")[1].isdigit() for r in rows)
    # every task ran inside Slurm and left its log
    assert len(list((spec.out_dir / "slurm").glob("*.out"))) == 16
    # re-running submits nothing
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    assert "0 runs to submit, 16 skipped" in capsys.readouterr().out
    assert main(["collect", str(spec_path)]) == 0 and main(["fit", str(spec_path), "--top-k", "8"]) == 0
    assert main(["plot", str(spec_path)]) == 0
    assert (spec.out_dir / "plots" / "isoflop.png").exists()


@pytest.mark.slow
def test_tiny_sweep_of_the_real_trainer_as_slurm_job_arrays(slurm, tmp_path, capsys):
    """The real trainer in Slurm array tasks: two sizes at one budget, base runs then their cooldown
    branches (the branch array starts from the base runs' checkpoints). The array mechanics at full
    size, collect, fit and plot are test_sweep_as_slurm_job_arrays's (fake trainer, same spec); the
    real trainer's full tiny sweep and fit are test_e2e_trainer's, without Slurm."""
    replace = {"compare_from_scratch = true": "compare_from_scratch = false", "dims = [32, 48, 64, 96]": "dims = [32, 48]",
               "budgets = [6e9, 1.2e10, 2.4e10]": "budgets = [3e9]"}
    spec_path = write_spec(tmp_path, trainer=[sys.executable, "-m", "trainer", "train"], replace=replace)
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == 4 and all(r["status"] == "done" for r in rows), \
        [(r["run_id"], r["status"], r["error"]) for r in rows if r["status"] != "done"]
    assert sum(r["kind"] == "branch" for r in rows) == 2 and all(r["slurm_job"] for r in rows)
    for r in rows:
        summary = json.loads((spec.out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert r["n_params"] == summary["n_params"] and 0 < summary["final_val_loss"] < 6.0
    capsys.readouterr()
    assert main(["run", str(spec_path), "--slurm", "--jobs", "2", "--wait"]) == 0
    assert "0 runs to submit, 4 skipped" in capsys.readouterr().out
    assert main(["collect", str(spec_path)]) == 0


def _squeue(*fmt) -> list[list[str]]:
    out = subprocess.run(["squeue", "-h", "-o", " ".join(fmt)], capture_output=True, text=True).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_sweep_run_preempted_by_the_signal_is_requeued_and_resumes(slurm, tmp_path):
    """The real trainer in an array task. SIGUSR1 to the batch shell (what `--signal=B:USR1@T`
    sends before the time limit) reaches the trainer through srun and `sweep exec`; it saves and
    exits with 75, the task requeues itself and resumes its run from that checkpoint. The branch
    (second array) waits for the resumed base run: its checkpoint did not exist when the base stopped."""
    replace = {"compare_from_scratch = true": "compare_from_scratch = false", "dims = [32, 48, 64, 96]": "dims = [32]",
               "budgets = [6e9, 1.2e10, 2.4e10]": "budgets = [6e9]"}
    spec_path = write_spec(tmp_path, trainer=[sys.executable, "-m", "tests.launch.slow_trainer"], replace=replace)
    spec_path.write_text(spec_path.read_text() + f'\n[slurm]\nprofile = "local"\npython = "{sys.executable}"\n')
    spec = load_spec(spec_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MESHFORMER_TEST_STEP_SLEEP": "0.5"}   # first attempt only
    proc = subprocess.Popen([sys.executable, "-m", "trainer", "sweep", "run", str(spec_path), "--slurm", "--wait"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base_id = "d32l1-lr0.003-s0-base"
    metrics = spec.out_dir / "runs" / base_id / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (metrics.exists() and '"loss"' in metrics.read_text()):   # training: signals are caught
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0] if proc.poll() else "slow"
            time.sleep(0.5)
        task = next(j for j, name in _squeue("%i", "%j") if name == "tiny-stage0")
        subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)
        waiting: dict[str, float] = {}
        while proc.poll() is None:       # start the requeued task now, not after Slurm's 120 s delay
            assert time.monotonic() < deadline + 300, "the sweep did not end"
            for job, reason in _squeue("%i", "%r"):
                if reason == "BeginTime" and time.monotonic() - waiting.setdefault(job, time.monotonic()) > 5:
                    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], timeout=30)
            time.sleep(1)
        out = proc.communicate()[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "submitted stage 0: 1 runs" in out and "submitted stage 1: 1 runs" in out
    rows = {r["run_id"]: r for r in ResultsStore(spec.results_path).rows()}
    assert all(r["status"] == "done" for r in rows.values()), rows
    assert rows[base_id]["attempts"] == 2 and rows[base_id]["steps"] == rows[base_id]["steps_planned"]
    log = (spec.out_dir / "runs" / f"{base_id}.log").read_text()
    saved = int(re.search(r"SIGUSR1: saved step (\d+); exiting with code 75", log).group(1))
    assert f"resumed at step {saved}" in log
    task_log = next((spec.out_dir / "slurm").glob(f"{task}.out")).read_text()
    assert "requeueing job" in task_log and "(restart 1)" in task_log
    branch = next(r for r in rows.values() if r["kind"] == "branch")
    plan = json.loads((spec.out_dir / "plan.json").read_text())
    start = next(p for p in plan if p["run_id"] == branch["run_id"])["overrides"]["checkpoint.init_from"]
    assert saved < int(start.rsplit("-", 1)[1]), (saved, start)    # the branch's checkpoint came after the resume
    assert branch["attempts"] == 1


@pytest.mark.slow
def test_sweep_run_over_the_profile_layout_is_recorded_once(slurm, tmp_path, capsys):
    """A profile of 2 tasks: each array task starts 2 trainer processes (srun) that train the run
    together (FSDP over 2); only the first records it, so it ran once (one attempt) in a world of 2."""
    replace = {"enabled = true": "enabled = false", "dims = [32, 48, 64, 96]": "dims = [32, 48]",
               "budgets = [6e9, 1.2e10, 2.4e10]": "budgets = [6e9]",
               '"checkpoint.every" = 0': '"checkpoint.every" = 0\n"parallel.dp_shard" = 2'}
    spec_path = write_spec(tmp_path, trainer=[sys.executable, "-m", "trainer", "train"], replace=replace)
    spec_path.write_text(spec_path.read_text() + f'\n[slurm]\nprofile = "local"\ntasks_per_node = 2\n'
                                                  f'python = "{sys.executable}"\n')
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--slurm", "--jobs", "1", "--wait"]) == 0
    script = (spec.out_dir / "slurm" / "array-stage0.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in script and "--ntasks=2 --ntasks-per-node=2" in script
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == 2 and all(r["status"] == "done" and r["attempts"] == 1 for r in rows), rows
    for r in rows:
        summary = json.loads((spec.out_dir / "runs" / r["run_id"] / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["steps"] == r["steps_planned"]
