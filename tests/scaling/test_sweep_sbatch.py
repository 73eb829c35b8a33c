"""The array script of a sweep stage comes from launch/'s renderer: it carries the cluster profile's
layout, signal and requeue lines, each array index runs its own run, and a run stopped by the
time-limit signal is requeued and resumes. Run here with stand-in srun/scontrol (no Slurm needed);
tests/scaling/test_slurm.py does it with a real Slurm and the real trainer."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import ConfigError
from launch.exit_codes import EXIT_PREEMPTED
from scaling.cli import main as scaling_main
from scaling.plan import plan_sweep
from scaling.runner import COMPLETE_MARKER, PREEMPTED_MARKER, write_plan
from scaling.slurm_arrays import ArrayStage
from scaling.spec import load_spec
from scaling.store import ResultsStore
from trainer.checkpoint import PREEMPTED_MARKER as TRAINER_PREEMPTED
from trainer.checkpoint_files import COMPLETE
from trainer.sweep_slurm import render_stage

from .helpers import REPO, write_spec

# the 4 base runs of the tiny sweep's first stage (its 12 branches wait in the second)
NO_SCRATCH = {"compare_from_scratch = true": "compare_from_scratch = false"}


def _stage0(tmp_path, slurm_table: str, base: str = ""):
    replace = dict(NO_SCRATCH)
    if base:
        replace['"checkpoint.every" = 0'] = f'"checkpoint.every" = 0\n{base}'
    path = write_spec(tmp_path, replace=replace)
    path.write_text(path.read_text() + "\n[slurm]\n" + slurm_table)
    spec = load_spec(path)
    runs = plan_sweep(spec)
    write_plan(spec, runs)
    ids = tuple(r.run_id for r in runs if r.stage == 0)
    return spec, ArrayStage(0, ids, spec.out_dir.resolve() / "slurm" / "array-stage0.runs", 2, ("--exclusive",))


def test_names_restated_in_scaling_match_the_trainer():
    assert (COMPLETE_MARKER, PREEMPTED_MARKER) == (COMPLETE, TRAINER_PREEMPTED)


def test_array_script_carries_the_profile_layout_signal_and_requeue(tmp_path):
    """A 2-node x 8-GPU profile in torchrun mode; the sweep's runs shard over its 16 processes."""
    spec, stage = _stage0(tmp_path, 'profile = "example-ib"\nmode = "torchrun"\ntime = "04:00:00"\n',
                          base='"parallel.dp_shard" = 16')
    s = render_stage(spec, stage)
    logs = spec.out_dir.resolve() / "slurm"
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=12", "#SBATCH --time=04:00:00", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --requeue", "#SBATCH --array=0-3%2", "#SBATCH --job-name=tiny-stage0",
                 f"#SBATCH --output={logs}/%A_%a.out", "#SBATCH --exclusive", "#SBATCH --partition=gpu",
                 "export NCCL_IB_HCA=mlx5_0", "module load cuda/12.4 nccl", 'scontrol requeue "$SLURM_JOB_ID"',
                 'kill -s TERM "$step_pid"', f'[ "$rc" = {EXIT_PREEMPTED} ]'):
        assert line in s, line
    assert "--ntasks=2 --ntasks-per-node=1 --cpus-per-task=96" in s          # one torchrun per node
    assert "--nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d" in s
    assert (f'-m trainer \\\n  sweep exec {spec.path} --run-list {logs}/array-stage0.runs '
            '--run-index "${SLURM_ARRAY_TASK_ID:-0}" ${resume_args[@]+"${resume_args[@]}"}') in s
    assert "--ntasks=1\n" not in s and "resume_args=(--run.overwrite false)" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


def test_layout_that_does_not_fit_the_profile_is_refused_before_queueing(tmp_path):
    spec, stage = _stage0(tmp_path, 'profile = "local"\nnodes = 2\n', base='"parallel.dp_shard" = 3')
    with pytest.raises(ConfigError, match=r"sweep run d32l1-lr0.003-s0-base: parallel: .*world size is 2"):
        render_stage(spec, stage)
    spec, stage = _stage0(tmp_path, 'module = "tests.launch.slow_trainer"\n')
    with pytest.raises(ConfigError, match=r"\[slurm\] module: .*\[sweep\] trainer"):
        render_stage(spec, stage)


def test_python_m_scaling_points_slurm_to_meshformer_sweep(tmp_path, capsys):
    assert scaling_main(["run", str(write_spec(tmp_path)), "--slurm"]) == 2
    assert "meshformer sweep run --slurm" in capsys.readouterr().err


STAND_IN_SRUN = """#!/bin/bash
echo "srun $*" >> "$LOG"
while [ "${1#--}" != "$1" ]; do shift; done        # drop srun's options: run the task's command
export SLURM_PROCID=0 SLURM_STEP_ID=0 SLURM_STEP_NUM_TASKS=1 SLURM_LOCALID=0 SLURM_NODEID=0
exec "$@"
"""
STAND_IN_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$LOG"
case "$1 $2" in "show hostnames") echo n1;; "show node") echo "NodeName=n1 NodeAddr=127.0.0.1";; esac
"""


def _job(tmp_path, script: Path, index: int, restarts: int, env: dict) -> subprocess.Popen:
    """The batch script of array task `index` as Slurm would start it (stand-in srun and scontrol)."""
    env = {**env, "SLURM_JOB_ID": f"9{index}", "SLURM_ARRAY_JOB_ID": "90", "SLURM_ARRAY_TASK_ID": str(index),
           "SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": str(restarts)}
    return subprocess.Popen(["bash", str(script)], env=env, cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_array_task_runs_its_run_and_a_signalled_run_requeues_and_resumes(tmp_path):
    spec, stage = _stage0(tmp_path, f'profile = "local"\npython = "{sys.executable}"\n')
    stage.run_list.parent.mkdir(parents=True, exist_ok=True)
    stage.run_list.write_text("".join(f"{r}\n" for r in stage.run_ids))
    script = tmp_path / "array.sbatch"
    script.write_text(render_stage(spec, stage))
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for name, text in (("srun", STAND_IN_SRUN), ("scontrol", STAND_IN_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "calls.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{bin_}:{env['PATH']}", LOG=str(log), PYTHONPATH=str(REPO), FAKE_PREEMPT_AT="3")
    target = stage.run_ids[2]
    run_dir = spec.out_dir / "runs" / target
    store = ResultsStore(spec.results_path)

    # first start of task 2: its run trains; SIGUSR1 to the batch shell (Slurm's time-limit warning)
    job = _job(tmp_path, script, 2, 0, env)
    for _ in range(600):
        if (run_dir / "waiting-for-signal").exists() or job.poll() is not None:
            break
        time.sleep(0.1)
    assert (run_dir / "waiting-for-signal").exists(), job.communicate()[0]
    job.send_signal(signal.SIGUSR1)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out                       # requeued: the task itself ends well
    assert "training step ended with exit code 75" in out, out
    assert "scontrol requeue 92" in log.read_text()
    row = store.get(target)
    assert row["status"] == "preempted" and row["slurm_job"] == "90_2", row
    assert all(store.get(r)["status"] == "pending" for r in stage.run_ids if r != target)

    # the requeued task: the script appends --run.overwrite false; the run resumes at step 3
    job = _job(tmp_path, script, 2, 1, env)
    out, _ = job.communicate(timeout=120)
    assert job.returncode == 0, out
    assert f"--run-index 2 --run.overwrite false" in log.read_text()
    row = store.get(target)
    assert row["status"] == "done" and row["attempts"] == 2, row
    assert "resumed at step 3" in (spec.out_dir / "runs" / f"{target}.log").read_text()
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x
             and "val_loss" not in x]
    assert steps == list(range(1, row["steps_planned"] + 1))   # no step lost or repeated
    assert not (run_dir / PREEMPTED_MARKER).exists()
    assert json.loads((run_dir / "summary.json").read_text())["preempted"] is False
    assert all(store.get(r)["status"] == "pending" for r in stage.run_ids if r != target)
