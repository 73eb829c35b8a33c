"""A real Slurm (slurmctld + slurmd on loopback, one node) for the sweep's job-array test, started
the way ../shared/tools/local-slurm/start.sh does, but on free ports and a private state folder
so that it can run beside another test's Slurm. Needs root and Debian's slurm packages."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """ClusterName=sweep
SlurmctldHost=localhost
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d}/munge/munge.sock
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=sched_interval=1
SlurmctldPort={ctld_port}
StateSaveLocation={d}/state/ctld
SlurmdSpoolDir={d}/state/d-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node_port} CPUs={cpus} RealMemory=1000
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def why_not() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm needs root"
    missing = [b for b in ("slurmctld", "slurmd", "sbatch", "munged") if not shutil.which(b)]
    if missing:
        return f"Slurm not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_munge(d: Path) -> Path:
    """A munged of our own on a private socket: a shared one may be stopped by another test's
    Slurm teardown while our jobs still need it. Returns its pid file."""
    m = d / "munge"
    m.mkdir(parents=True, exist_ok=True)
    key = m / "munge.key"
    subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, timeout=20)
    for p in (m, key):
        shutil.chown(p, "munge", "munge")
    key.chmod(0o600)
    pid = m / "munged.pid"
    subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={m / 'munge.sock'}",
                    f"--key-file={key}", f"--pid-file={pid}", f"--log-file={m / 'munged.log'}",
                    f"--seed-file={m / 'munged.seed'}"], check=True, timeout=20)
    return pid


class LocalSlurm:
    def __init__(self, d: Path, cpus: int = 2):
        self.d = Path(d)
        for sub in ("state/ctld", "state/d-n1", "log", "run"):
            (self.d / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.d / "slurm.conf"
        self.conf.write_text(CONF.format(d=self.d, ctld_port=_free_port(), node_port=_free_port(), cpus=cpus))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.munge_pid: Path | None = None

    def start(self) -> "LocalSlurm":
        self.d.chmod(0o755)        # munged (user munge) must reach its folder
        self.munge_pid = _start_munge(self.d)
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], check=True, timeout=20, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf), "-N", "n1"], check=True, timeout=20, env=self.env)
        for _ in range(120):
            out = subprocess.run(["sinfo", "-h", "-o", "%D %T"], capture_output=True, text=True, env=self.env)
            if out.stdout.strip() == "1 idle":
                return self
            time.sleep(0.5)
        raise RuntimeError(f"local Slurm did not come up; see {self.d / 'log'}")

    def stop(self) -> None:
        jobs = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=self.env).stdout.split()
        if jobs:
            subprocess.run(["scancel", "--full", *jobs], env=self.env, timeout=10)
        pids = [int(p.read_text()) for p in (self.d / "run").glob("*.pid") if p.read_text().strip()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for pid in pids:
            for _ in range(40):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.25)
        if self.munge_pid is not None and self.munge_pid.exists():   # last: slurmd needs it to stop
            try:
                os.kill(int(self.munge_pid.read_text()), signal.SIGTERM)
            except ProcessLookupError:
                pass
