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


def _ensure_munge() -> bool:
    """Start munged unless one is running; returns True when we started it."""
    if Path("/run/munge/munge.socket.2").exists():
        return False
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    key = Path("/etc/munge/munge.key")
    if not key.exists() or key.stat().st_size == 0:
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, timeout=20)
    return True


class LocalSlurm:
    def __init__(self, d: Path, cpus: int = 2):
        self.d = Path(d)
        for sub in ("state/ctld", "state/d-n1", "log", "run"):
            (self.d / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.d / "slurm.conf"
        self.conf.write_text(CONF.format(d=self.d, ctld_port=_free_port(), node_port=_free_port(), cpus=cpus))
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.started_munge = False

    def start(self) -> "LocalSlurm":
        self.started_munge = _ensure_munge()
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
        if self.started_munge and Path("/run/munge/munged.pid").exists():
            pids.append(int(Path("/run/munge/munged.pid").read_text()))
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
