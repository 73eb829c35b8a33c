"""The sbatch script: what it asks Slurm for, how it starts the trainer, and (with stand-in srun
and scontrol commands) what it does on the time-limit signal."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch.sbatch import render
from launch.slurm_profile import SlurmProfile, load_profile, time_seconds
from core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd=REPO):
    from tests.launch.conftest import child_env
    return subprocess.run([sys.executable, "-m", "trainer.cli", "slurm", *args], cwd=cwd, env=child_env(),
                          capture_output=True, text=True, timeout=120)


def test_dry_run_prints_the_job():
    done = cli("--config", "configs/tiny.toml", "--profile", "local", "--nodes", "2", "--tasks-per-node", "2",
               "--time", "00:10:00", "--dry-run", "--train.steps", "7", "--optim.lr", "1e-3")
    assert done.returncode == 0, done.stderr
    s = done.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --time=00:10:00",
                 "#SBATCH --signal=B:USR1@60", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 f"#SBATCH --chdir={REPO}", "#SBATCH --job-name=meshformer-tiny",
                 f"#SBATCH --output={REPO}/runs/tiny/slurm-%j.out"):     # the log: in the run folder
        assert line in s
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4 --ntasks-per-node=2 --cpus-per-task=1" in s
    assert f"python -u -m trainer \\\n  --config {REPO}/configs/tiny.toml --train.steps 7 --optim.lr 1e-3" in s
    assert "scontrol requeue" in s and '"yes"' not in s      # the requeue block is rendered, not a runtime test
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0


def test_requeue_off_renders_no_requeue_and_a_valid_script():
    p = SlurmProfile(requeue=False, signal_seconds=60, time="10")
    s = render(p, ["--config", "c.toml"], job_name="j", chdir="/tmp", log_dir="/runs/r")
    assert "#SBATCH --no-requeue" in s and "scontrol requeue" not in s and "slurm.requeue = false" in s
    assert "#SBATCH --output=/runs/r/slurm-%j.out" in s
    assert subprocess.run(["bash", "-n"], input=s, text=True).returncode == 0
    # a profile's own output wins over the run folder
    assert "#SBATCH --output=/logs/%j.log" in render(SlurmProfile(output="/logs/%j.log"), [], job_name="j",
                                                      chdir="/tmp", log_dir="/runs/r")


def test_submit_makes_the_run_folder_for_the_log_first(tmp_path, monkeypatch, capsys):
    """Slurm opens --output before the job starts and makes no folder: the submit makes it (one per
    array task when run.dir holds the task slot). A stand-in sbatch records the script it got."""
    from launch.slurm_submit import array_indices, main
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "sbatch").write_text(f"#!/bin/bash\ncat > {tmp_path}/got.sh\n")
    (bin_ / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_}:{os.environ['PATH']}")
    run = tmp_path / "runs" / "a"
    assert main(["--config", str(REPO / "configs/tiny.toml"), "--run.dir", str(run)]) == 0
    assert run.is_dir() and f"#SBATCH --output={run}/slurm-%j.out" in (tmp_path / "got.sh").read_text()
    assert main(["--config", str(REPO / "configs/tiny.toml"), "--array", "1-5:2%2",
                 "--run.dir", str(tmp_path / "s-{array_task}")]) == 0
    assert sorted(p.name for p in tmp_path.glob("s-*")) == ["s-1", "s-3", "s-5"]
    assert f"#SBATCH --output={tmp_path}/s-%a/slurm-%A_%a.out" in (tmp_path / "got.sh").read_text()
    assert array_indices("0-6:2,9%2") == [0, 2, 4, 6, 9] and array_indices("3") == [3]


def test_ib_profile_and_torchrun_mode(capsys):
    from launch.slurm_submit import main
    assert main(["--config", str(REPO / "configs/tiny.toml"), "--profile", "example-ib", "--mode", "torchrun",
                 "--partition", "big", "--account", "proj1", "--dry-run", "--parallel.dp_shard", "16"]) == 0
    s = capsys.readouterr().out
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --partition=big", "#SBATCH --account=proj1",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "export NCCL_IB_HCA=mlx5_0,mlx5_1",
                 "export NCCL_SOCKET_IFNAME='^lo,docker'",
                 "export TORCH_NCCL_ASYNC_ERROR_HANDLING=1", "module load cuda/12.4 nccl"):
        assert line in s
    assert "--ntasks=2 --ntasks-per-node=1 --cpus-per-task=96" in s
    assert ('python -u -m torch.distributed.run --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d '
            '"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT" "--rdzv-id=$SLURM_JOB_ID" -m trainer') in s
    assert 'kill -s TERM "$step_pid"' in s     # torchrun passes TERM on to its workers
    assert "NCCL_IB_GID_INDEX" not in s         # RoCE-only: wrong on the example's InfiniBand
    assert "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in s     # ... and waits signal_seconds (the profile's), not 30 s


@pytest.mark.parametrize("args, match", [
    (["--nodes", "2", "--tasks-per-node", "2", "--parallel.dp_shard", "3"], r"= 3, but the world size is 4 .*4 processes"),
    (["--tasks-per-node", "9", "--gpus-per-node", "8"], "slurm.tasks_per_node: 9 processes per node but only 8 GPUs"),
    (["--time", "1", "--signal-seconds", "60"], "slurm.signal_seconds: 60 s is not below the time limit"),
    (["--time", "soon"], "slurm.time: 'soon' is not a Slurm time limit"),
    (["--profile", "nowhere"], "slurm profile 'nowhere' not found.*known: .*local"),
    (["--train.stepz", "3"], "train.stepz"),
    (["--launch.launcher", "mpi"], "launch.launcher: 'mpi' contradicts slurm.mode='tasks'"),
])
def test_bad_input_is_refused_before_queueing(args, match, capsys):
    from launch.slurm_submit import main
    with pytest.raises(ConfigError, match=match):
        main(["--config", str(REPO / "configs/tiny.toml"), "--dry-run", *args])
    assert capsys.readouterr().out == ""        # no script printed


def test_cli_reports_bad_input_with_exit_code_2():
    done = cli("--config", "configs/tiny.toml", "--dry-run", "--nodes", "3", "--parallel.dp_replicate", "2")
    assert done.returncode == 2 and done.stdout == ""
    assert "meshformer slurm: config error: parallel:" in done.stderr and "3 processes" in done.stderr


def test_profile_file_checks(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text("[slurm]\nnodez = 2\n")
    with pytest.raises(ConfigError, match="slurm.nodez: unknown key; did you mean 'nodes'"):
        load_profile(str(bad))
    hw = tmp_path / "hw.toml"                 # a planner hardware profile without a [slurm] table
    hw.write_text('name = "x"\ngpus_per_node = 4\n')
    p = load_profile(str(hw))
    assert (p.gpus_per_node, p.tasks_per_node) == (4, 4)


def test_time_formats():
    assert [time_seconds(t) for t in ("5", "1:30", "02:00:00", "1-00:00:00", "1-2")] == [300, 90, 7200, 86400, 93600]


def test_array_slot_expands_per_task():
    p = SlurmProfile(nodes=1, tasks_per_node=1, signal_seconds=0)
    s = render(p, ["--run.dir", "runs/sweep-{array_task}/x y"], job_name="j", chdir="/tmp", array="0-3")
    assert "#SBATCH --array=0-3" in s and "#SBATCH --output=slurm-%A_%a.out" in s
    line = next(l for l in s.splitlines() if "--run.dir" in l)
    words = subprocess.run(["bash", "-c", f"resume_args=(); printf '%s\\n' {line.split(' ${resume')[0]}"],
                           env={"SLURM_ARRAY_TASK_ID": "2", "PATH": os.environ["PATH"]},
                           capture_output=True, text=True).stdout.splitlines()
    assert words == ["--run.dir", "runs/sweep-2/x y"]


FAKE_SRUN = """#!/bin/bash
trap 'echo "step got USR1" >> "$LOG"; exit ${STEP_EXIT_ON_SIGNAL:-42}' USR1
echo "srun $*" >> "$LOG"
for _ in $(seq 600); do sleep 0.1; done
"""
FAKE_SCONTROL = """#!/bin/bash
echo "scontrol $*" >> "$LOG"
case "$1 $2" in "show hostnames") echo n1; echo n2;; "show node") echo "NodeName=n1 NodeAddr=10.9.9.9 x=y";; esac
"""


def _run_with_signal(tmp_path, restarts="0", step_exit="42"):
    """Run the rendered script with stand-in srun/scontrol, send it SIGUSR1 once the step runs."""
    bin_ = tmp_path / "bin"
    bin_.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_ / name).write_text(text)
        (bin_ / name).chmod(0o755)
    log = tmp_path / "log"
    log.write_text("")
    p = SlurmProfile(nodes=2, tasks_per_node=2, time="10", signal_seconds=60, max_requeues=3)
    script = tmp_path / "job.sh"
    script.write_text(render(p, ["--config", "c.toml"], job_name="j", chdir=str(tmp_path)))
    env = {"PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "SLURM_JOB_ID": "99",
           "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_RESTART_COUNT": restarts, "STEP_EXIT_ON_SIGNAL": step_exit}
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for _ in range(100):
        if "srun " in log.read_text():
            break
        time.sleep(0.1)
    time.sleep(0.3)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, log.read_text(), out


def test_signal_is_forwarded_and_the_job_requeues(tmp_path):
    rc, log, out = _run_with_signal(tmp_path)
    assert "srun --kill-on-bad-exit=1 --nodes=2 --ntasks=4" in log
    assert "step got USR1" in log
    assert "scontrol requeue 99" in log
    assert rc == 0, out
    assert "rendezvous 10.9.9.9:20099" in out            # NodeAddr of the first node, port from the job id
    assert "--run.overwrite" not in log                   # first run: no resume arguments


def test_requeued_run_resumes_and_stops_requeueing_at_the_limit(tmp_path):
    rc, log, out = _run_with_signal(tmp_path, restarts="3")
    assert "--config c.toml --run.overwrite false" in log
    assert "scontrol requeue" not in log and "reached slurm.max_requeues" in out
    assert rc == 42


def test_step_that_finished_cleanly_is_not_requeued(tmp_path):
    rc, log, out = _run_with_signal(tmp_path, step_exit="0")
    assert "step got USR1" in log and "scontrol requeue" not in log
    assert rc == 0


def test_trainer_exit_75_requeues_without_our_signal(tmp_path):
    """A trainer that saved on a signal which reached it another way (e.g. scancel --signal=USR1
    JOB.0) exits with EXIT_PREEMPTED: the script requeues on that code alone."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "srun").write_text('#!/bin/bash\necho "srun $*" >> "$LOG"\nexit 75\n')
    (bin_ / "scontrol").write_text(FAKE_SCONTROL)
    for f in bin_.iterdir():
        f.chmod(0o755)
    log = tmp_path / "log"
    script = tmp_path / "job.sh"
    script.write_text(render(SlurmProfile(), ["--config", "c.toml"], job_name="j", chdir=str(tmp_path)))
    done = subprocess.run(["bash", str(script)], env={"PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log),
                          "SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "n1"}, capture_output=True, text=True, timeout=30)
    assert "scontrol requeue 5" in log.read_text() and done.returncode == 0
