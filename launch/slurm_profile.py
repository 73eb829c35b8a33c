"""A cluster's Slurm settings: the `[slurm]` table of a TOML profile.

Profiles live in configs/slurm/<name>.toml, or as a `[slurm]` table inside a hardware profile
configs/clusters/<name>.toml (whose top-level gpus_per_node is then the default). Command-line
flags of `meshformer slurm` override single keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.config_parse import ConfigError, option

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
_TIME = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


@dataclass
class SlurmProfile:
    nodes: int = option("nodes to allocate", 1)
    tasks_per_node: int = option("training processes per node (= GPUs per node on GPU nodes)", 1)
    gpus_per_node: int = option("GPUs to request per node (0 = CPU nodes, gloo)", 0)
    cpus_per_task: int = option("CPU cores per training process (also OMP_NUM_THREADS)", 1)
    mem: str = option("memory per node, e.g. '0' (all) or '200G'; empty = the cluster's default", "")
    partition: str = option("partition (empty = the cluster's default)", "")
    account: str = option("account to charge (empty = your default)", "")
    qos: str = option("quality of service (empty = default)", "")
    time: str = option("time limit: MM, HH:MM:SS or D-HH:MM:SS", "01:00:00")
    job_name: str = option("job name (empty = meshformer-<run folder name>)", "")
    output: str = option("job log file (%j = job id; %A_%a in arrays); empty = <run.dir>/slurm-%j.out, "
                         "the run folder (made at submit time)", "")
    mode: Literal["tasks", "torchrun"] = option(
        "'tasks': srun starts one trainer per GPU (SLURM_* variables); 'torchrun': srun starts one torchrun "
        "per node (c10d rendezvous on the first node)", "tasks")
    signal_seconds: int = option("ask Slurm for SIGUSR1 this many seconds before the time limit (0 = none); the "
                             "trainer checkpoints and the job requeues itself", 300)
    requeue: bool = option("requeue the job after a signal-triggered checkpoint", True)
    max_requeues: int = option("stop requeueing after this many restarts", 20)
    python: str = option("the Python that runs the trainer on the nodes", "python")
    module: str = option("the module the tasks run (python -m MODULE --config ...)", "trainer")
    master_port: int = option("rendezvous port (0 = 20000 + job id mod 10000)", 0)
    setup: list[str] = option("shell lines run before the job starts (module load ..., source venv/bin/activate)",
                          factory=list)
    container: list[str] = option("srun options that run the tasks in a container, e.g. "
                              "['--container-image=nvcr.io#nvidia/pytorch:25.01-py3', '--container-mounts=/data:/data']",
                              factory=list)
    srun_args: list[str] = option("more srun options", factory=list)
    sbatch_args: list[str] = option("more #SBATCH options, e.g. ['--exclusive', '--constraint=h100']", factory=list)
    env: dict[str, str] = option("environment of the job: NCCL_IB_HCA, NCCL_SOCKET_IFNAME, NCCL_IB_GID_INDEX "
                             "(RoCE only), TORCH_NCCL_ASYNC_ERROR_HANDLING, ...", factory=dict)

    def validate(self) -> None:
        for name in ("nodes", "tasks_per_node", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"slurm.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("gpus_per_node", "signal_seconds", "max_requeues"):
            if getattr(self, name) < 0:
                raise ConfigError(f"slurm.{name}: must be >= 0, got {getattr(self, name)}")
        if self.gpus_per_node and self.tasks_per_node > self.gpus_per_node:
            raise ConfigError(f"slurm.tasks_per_node: {self.tasks_per_node} processes per node but only "
                              f"{self.gpus_per_node} GPUs per node; use at most one process per GPU")
        if self.mode not in ("tasks", "torchrun"):
            raise ConfigError(f"slurm.mode: {self.mode!r} is not 'tasks' or 'torchrun'")
        limit = time_seconds(self.time)
        if self.signal_seconds and self.signal_seconds >= limit:
            raise ConfigError(f"slurm.signal_seconds: {self.signal_seconds} s is not below the time limit "
                              f"{self.time!r} ({limit} s); the signal would come before training starts")
        if not 0 <= self.master_port <= 65535:
            raise ConfigError(f"slurm.master_port: {self.master_port} is not a port")
        for k, v in self.env.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
                raise ConfigError(f"slurm.env: {k!r} is not a valid environment variable name")
            if not isinstance(v, (str, int, float, bool)):
                raise ConfigError(f"slurm.env.{k}: expected a string or number, got {v!r}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.tasks_per_node


def time_seconds(text: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = _TIME.match(str(text).strip())
    if not m:
        raise ConfigError(f"slurm.time: {text!r} is not a Slurm time limit (MM, HH:MM:SS or D-HH:MM:SS)")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is None:
        parts = [p for p in (a, b, c) if p is not None]
        if len(parts) == 1:
            return parts[0] * 60
        if len(parts) == 2:
            return parts[0] * 60 + parts[1]
        return parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)


def find_profile(name: str) -> Path:
    """A path, or a name looked up in configs/slurm/ then configs/clusters/ (here, then in the repo)."""
    p = Path(name)
    if p.is_file():
        return p
    roots = [Path("configs"), REPO_CONFIGS]
    tried = []
    for root in roots:
        for sub in ("slurm", "clusters"):
            cand = root / sub / f"{name}.toml"
            tried.append(str(cand))
            if cand.is_file():
                return cand
    known = sorted({c.stem for root in roots for sub in ("slurm", "clusters") for c in (root / sub).glob("*.toml")})
    raise ConfigError(f"slurm profile {name!r} not found (tried {name}, {', '.join(tried[:2])}); "
                      f"known: {', '.join(known) or 'none'}")


def load_profile(name: str | None, overrides: dict | None = None) -> SlurmProfile:
    table: dict = {}
    if name:
        path = find_profile(name)
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"slurm profile {str(path)!r} is not valid TOML: {e}") from None
        table = dict(data.get("slurm", {}))
        if not table and "gpus_per_node" not in data:
            raise ConfigError(f"slurm profile {str(path)!r} has no [slurm] table")
        if "gpus_per_node" in data and "gpus_per_node" not in table:
            table["gpus_per_node"] = data["gpus_per_node"]
            table.setdefault("tasks_per_node", data["gpus_per_node"])
    table.update({k: v for k, v in (overrides or {}).items() if v is not None})
    names = {f.name for f in dataclasses.fields(SlurmProfile)}
    for key in table:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            raise ConfigError(f"slurm.{key}: unknown key" + (f"; did you mean {close[0]!r}?" if close else
                                                              f"; known: {', '.join(sorted(names))}"))
    profile = SlurmProfile(**table)
    profile.validate()
    return profile
