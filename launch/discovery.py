"""Who this process is in the job: rank, world, local rank, node rank and the rendezvous address,
read from whichever launcher started it.

- torchrun (and `accelerate launch`, which runs torchrun): RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK,
  MASTER_ADDR/MASTER_PORT; torchrun's agent already runs the rendezvous store.
- an srun step (one task per GPU): SLURM_PROCID, SLURM_STEP_NUM_TASKS (or SLURM_NTASKS), SLURM_LOCALID,
  SLURM_NODEID; the address is $MASTER_ADDR or the first host of SLURM_JOB_NODELIST, the port
  $MASTER_PORT or one derived from the job id, so every task computes the same pair alone.
- mpiexec: mpi4py's COMM_WORLD; rank 0 picks its address and a free port and broadcasts them.

Everything here is a pure function of the environment (passed in) so tests need no launcher.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Mapping

from core.errors import LaunchError
from core.launch_config import LaunchConfig
from launch.hostlist import hostnames, node_address

# Variables that only an MPI launcher sets (MPICH/Hydra, Open MPI, PMIx, Intel MPI).
MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")



@dataclass(frozen=True)
class ProcessInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = ""
    master_port: int = 0
    launcher: str = "none"       # torchrun | accelerate | slurm | mpi | none
    agent_store: bool = False    # True: a launcher agent (torchrun) already serves the rendezvous store

    def check(self) -> "ProcessInfo":
        where = f"{self.launcher} launch"
        if self.world_size < 1:
            raise LaunchError(f"{where}: world size {self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise LaunchError(f"{where}: rank {self.rank} is outside the world of {self.world_size} processes")
        if self.local_rank < 0 or self.node_rank < 0:
            raise LaunchError(f"{where}: negative local rank ({self.local_rank}) or node rank ({self.node_rank})")
        if self.world_size > 1 and (not self.master_addr or not 0 < self.master_port <= 65535):
            raise LaunchError(f"{where}: rendezvous address {self.master_addr or '?'}:{self.master_port or '?'} "
                              "is incomplete; set MASTER_ADDR and MASTER_PORT (or launch.master_addr/master_port)")
        return self


def _int(env: Mapping[str, str], name: str, default: int | None = None, *, why: str = "") -> int:
    value = env.get(name, "")
    if value == "":
        if default is None:
            raise LaunchError(f"environment variable {name} is not set{why}")
        return default
    try:
        return int(value)
    except ValueError:
        raise LaunchError(f"environment variable {name}={value!r} is not an integer") from None


def _tasks_per_node(value: str) -> int:
    """The first node's count in Slurm's "2(x3),1" notation."""
    head = value.split(",")[0].split("(")[0]
    return int(head) if head.isdigit() else 1


def from_torchrun(env: Mapping[str, str]) -> ProcessInfo:
    why = " (torchrun and accelerate launch set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
    world = _int(env, "WORLD_SIZE", why=why)
    rank = _int(env, "RANK", why=why)
    launcher = "accelerate" if any(k.startswith("ACCELERATE_") for k in env) else "torchrun"
    shared = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    if shared and _int(env, "TORCHELASTIC_RESTART_COUNT", 0) > 0:
        # The agent's store still holds the first attempt's addresses; a restarted rank may read a
        # peer's old one before the peer rewrites it and fail to connect (pytorch issue 135712).
        raise LaunchError("torchrun restarted the workers (TORCHELASTIC_RESTART_COUNT="
                          f"{env['TORCHELASTIC_RESTART_COUNT']}) but shares its rendezvous store with them, where the "
                          "previous attempt's addresses remain; start torchrun with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 "
                          "in its environment to give every restart a fresh store")
    return ProcessInfo(
        rank=rank, world_size=world, local_rank=_int(env, "LOCAL_RANK", 0),
        local_world_size=_int(env, "LOCAL_WORLD_SIZE", 1), node_rank=_int(env, "GROUP_RANK", 0),
        master_addr=env.get("MASTER_ADDR", ""), master_port=_int(env, "MASTER_PORT", 0), launcher=launcher,
        agent_store=shared).check()


def slurm_port(job_id: int) -> int:
    """The same port on every task without talking: above the usual service ports, below the
    Linux ephemeral range (32768+), so two jobs sharing a node rarely collide."""
    return 20000 + job_id % 10000


def from_slurm(env: Mapping[str, str], cfg: LaunchConfig | None = None) -> ProcessInfo:
    cfg = cfg or LaunchConfig()
    why = " (run the trainer with srun inside an allocation: one task per GPU)"
    rank = _int(env, "SLURM_PROCID", why=why)
    world = _int(env, "SLURM_STEP_NUM_TASKS", None) if env.get("SLURM_STEP_NUM_TASKS") else _int(env, "SLURM_NTASKS", why=why)
    addr = cfg.master_addr or env.get("MASTER_ADDR", "")
    if not addr and world > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise LaunchError("Slurm launch: SLURM_JOB_NODELIST is not set, so the first host (the rendezvous) "
                              "is unknown; set MASTER_ADDR or launch.master_addr")
        addr = node_address(hostnames(nodelist)[0])
    port = cfg.master_port or _int(env, "MASTER_PORT", 0)
    if not port and world > 1:
        port = slurm_port(_int(env, "SLURM_JOB_ID", why=" (needed to derive MASTER_PORT; or set MASTER_PORT)"))
    return ProcessInfo(
        rank=rank, world_size=world, local_rank=_int(env, "SLURM_LOCALID", 0),
        local_world_size=_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1")),
        node_rank=_int(env, "SLURM_NODEID", 0), master_addr=addr, master_port=port, launcher="slurm").check()


def free_port(host: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This host's address for other nodes: its name's address unless that is loopback (Debian
    maps the host name to 127.0.1.1), else the address of the interface of the default route
    (a UDP connect sends nothing). Set MASTER_ADDR or launch.master_addr to pick a network."""
    try:
        addr = socket.gethostbyname(socket.gethostname())
    except OSError:
        addr = "127.0.0.1"
    if not addr.startswith("127."):
        return addr
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
            return s.getsockname()[0]
        except OSError:
            return addr


def from_mpi(cfg: LaunchConfig | None = None, comm=None) -> ProcessInfo:
    """Rank and world from MPI; rank 0 picks the rendezvous and broadcasts it (mpiexec gives no
    MASTER_ADDR/PORT of its own)."""
    cfg = cfg or LaunchConfig()
    if comm is None:
        try:
            from mpi4py import MPI
        except ImportError:
            raise LaunchError("launched by mpiexec (or launch.launcher = 'mpi'), but mpi4py is not installed; "
                              "pip install 'meshformer[mpi]' (mpi4py and mpich)") from None
        comm = MPI.COMM_WORLD
        local = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_rank, local_size = local.Get_rank(), local.Get_size()
        local.Free()
    else:
        local_rank, local_size = comm.Get_rank(), comm.Get_size()
    rank, world = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    node_rank = list(dict.fromkeys(hosts)).index(hosts[rank])    # nodes numbered by first appearance
    rendezvous = None
    if rank == 0:
        addr = cfg.master_addr or os.environ.get("MASTER_ADDR", "") or (
            "127.0.0.1" if len(set(hosts)) == 1 else host_address())
        port = cfg.master_port or int(os.environ.get("MASTER_PORT", "0") or 0) or free_port()
        rendezvous = (addr, port)
    addr, port = comm.bcast(rendezvous, root=0)
    return ProcessInfo(rank=rank, world_size=world, local_rank=local_rank, local_world_size=local_size,
                       node_rank=node_rank, master_addr=addr, master_port=port, launcher="mpi").check()


def detect_launcher(env: Mapping[str, str]) -> str:
    """Which launcher started this process. torchrun first (its workers may also carry SLURM_* or
    MPI variables when torchrun itself runs under srun/mpiexec), then MPI (mpiexec inside a Slurm
    allocation inherits the batch script's SLURM_*), then an srun step (SLURM_STEP_ID is set in a
    step but not in the batch script, whose SLURM_NTASKS describes the whole allocation)."""
    if "RANK" in env or "WORLD_SIZE" in env or "TORCHELASTIC_RUN_ID" in env:
        return "torchrun"
    if any(int(env.get(v, "0") or 0) > 1 for v in MPI_SIZE_VARS if env.get(v, "").isdigit()):
        return "mpi"
    if "SLURM_PROCID" in env and ("SLURM_STEP_ID" in env or "SLURM_STEPID" in env):
        return "slurm"
    return "none"


def discover(cfg: LaunchConfig | None = None, env: Mapping[str, str] | None = None) -> ProcessInfo:
    cfg = cfg or LaunchConfig()
    env = os.environ if env is None else env
    launcher = detect_launcher(env) if cfg.launcher == "auto" else cfg.launcher
    if launcher == "none" and cfg.launcher == "auto" and "ACCELERATE_MIXED_PRECISION" in env and "MASTER_ADDR" in env:
        # accelerate's "simple" launcher: it sets MASTER_ADDR when --num_processes/--num_machines ask
        # for more than one process, but starts only one, without RANK (commands/launch.py).
        raise LaunchError("accelerate launch started one process where several were asked for: on a machine "
                          "without GPUs it starts them (through torchrun, still on the CPU) only with --multi_gpu, "
                          "or with distributed_type: MULTI_GPU in its config; add --multi_gpu (and drop --cpu, "
                          "which forces one process; or unset MASTER_ADDR to train in one process)")
    if launcher == "torchrun":
        return from_torchrun(env)
    if launcher == "slurm":
        return from_slurm(env, cfg)
    if launcher == "mpi":
        return from_mpi(cfg)
    return ProcessInfo()
