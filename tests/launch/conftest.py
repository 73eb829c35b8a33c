"""Fixtures for launcher tests: a real Slurm on loopback, and helpers to run the trainer CLI under
torchrun, srun/sbatch and mpiexec and read back its losses."""
from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SLURM_EXES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "munged")


def child_env(**extra) -> dict:
    """Environment for launched processes: the repo importable, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PMI_", "OMPI_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_range_free(base: int, n: int) -> bool:
    for port in range(base, base + n):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def last_loss(run_dir: Path) -> tuple[int, float]:
    """(step, loss) of the last training line of metrics.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in lines if "loss" in r]
    assert rows, f"no loss lines in {run_dir}/metrics.jsonl"
    return rows[-1]["step"], rows[-1]["loss"]


def assert_same_loss(a: Path, b: Path, rel: float = 1e-5) -> None:
    (sa, la), (sb, lb) = last_loss(a), last_loss(b)
    assert sa == sb, f"final steps differ: {a} at {sa}, {b} at {sb}"
    assert abs(la - lb) <= rel * abs(lb), f"final loss {la!r} ({a}) != {lb!r} ({b}) within {rel} relative"


class SlurmCluster:
    """slurmctld + N slurmd on loopback, state under `root`; `env` carries SLURM_CONF."""

    def __init__(self, root: Path, nodes: int):
        self.root, self.nodes = root, nodes
        self.env = child_env(SLURM_CONF=str(root / "slurm.conf"))

    def start(self) -> None:
        for _ in range(20):
            base = random.randint(17100, 19900)
            if _port_range_free(base, self.nodes):
                break
        env = dict(os.environ, D=str(self.root), N=str(self.nodes), CPUS="6",   # 3 jobs of 2x2 fit at once
                   CTLD_PORT=str(free_port()), NODE_PORT0=str(base))
        done = subprocess.run(["bash", str(HERE / "local_slurm" / "start.sh")], env=env, capture_output=True,
                              text=True, timeout=120)
        if done.returncode:
            raise RuntimeError(f"local Slurm did not start (exit {done.returncode}):\n{done.stdout}\n{done.stderr}\n"
                               + self.logs())

    def stop(self) -> None:
        subprocess.run(["bash", str(HERE / "local_slurm" / "stop.sh")], env=dict(os.environ, D=str(self.root)),
                       capture_output=True, timeout=120)

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    def run(self, *cmd: str, timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done

    def release_requeued(self, stop: threading.Event, released: list, settle_s: float = 5.0) -> None:
        """Start requeued jobs now instead of after Slurm's 120 s requeue delay, but only once a
        job has waited `settle_s`: a job restarted within a second of its requeue is refused by
        slurmd ("Job credential revoked") and fails."""
        waiting: dict[str, float] = {}
        while not stop.wait(1.0):
            out = self.run("squeue", "-h", "-o", "%i %r", check=False).stdout
            for line in out.splitlines():
                job, _, reason = line.partition(" ")
                if reason.strip() != "BeginTime":
                    continue
                first = waiting.setdefault(job, time.monotonic())
                if time.monotonic() - first >= settle_s:
                    self.run("scontrol", "update", f"jobid={job}", "StartTime=now", check=False)
                    released.append(job)
                    del waiting[job]


def slurm_unavailable() -> str:
    if os.geteuid() != 0:
        return "the local Slurm needs root (munged, slurmd)"
    missing = [e for e in SLURM_EXES if not shutil.which(e) and not Path("/usr/sbin", e).exists()]
    if missing:
        return ("Slurm packages missing (" + ", ".join(missing) + "); install Debian's slurmctld slurmd "
                "slurm-client munge (.ci/run does)")
    return ""


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def run_logged(cmd: list[str], log: Path, *, env: dict | None = None, timeout: float = 300,
               cwd: Path | None = None) -> int:
    """Run a launcher command in its own process group, output to `log`; on timeout kill the
    whole group (torchrun and mpiexec leave workers behind otherwise) and fail with the log."""
    import signal
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env or child_env(), stdout=out, stderr=subprocess.STDOUT,
                                cwd=cwd or REPO, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{' '.join(cmd)} ran over {timeout} s; log {log}:\n{tail(log)}")


def tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def find_mpiexec() -> str | None:
    """The mpiexec of this Python's environment (the mpich wheel mpi4py was built against) first."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")
