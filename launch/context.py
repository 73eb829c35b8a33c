"""Who this process is in the job, and the process group that joins them.

`DistContext` is the small object passed to whoever needs rank, world or device; there is no
module-level process-group state anywhere in the project. Discovery (which launcher, which rank)
lives in launch/discovery.py; this file turns a `ProcessInfo` into a process group and back.
"""
from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from core.errors import ConfigError
from core.launch_config import LaunchConfig
from launch.discovery import LaunchError, ProcessInfo, discover
from launch.watchdog import FR_BUFFER_SIZE, collective_timeout_s


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str = ""            # "" when no process group was created
    node_rank: int = 0
    launcher: str = "none"       # torchrun | accelerate | slurm | mpi | none
    master_addr: str = ""        # the rendezvous store, which launch/watchdog.py reports through
    master_port: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return bool(self.backend)


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device: 'cuda' was asked for but torch sees no CUDA device; use 'cpu' or 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise LaunchError(f"local rank {local_rank} has no GPU: this node shows {torch.cuda.device_count()}; "
                              "start at most one process per GPU (--tasks-per-node / --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _rendezvous_store(info: ProcessInfo, timeout_s: int) -> dist.Store:
    """The TCP store every process meets at; rank 0 serves it. Used where no launcher agent runs
    one (srun, mpiexec). Errors name the address and what to check instead of hanging."""
    where = f"{info.master_addr}:{info.master_port}"
    start = time.monotonic()
    try:
        return dist.TCPStore(info.master_addr, info.master_port, world_size=info.world_size,
                             is_master=info.rank == 0, timeout=datetime.timedelta(seconds=timeout_s),
                             wait_for_workers=True)
    except Exception as e:    # DistNetworkError / DistStoreError / RuntimeError, differing by torch version
        waited = time.monotonic() - start
        if info.rank == 0:
            hint = (f"rank 0 could not serve the rendezvous at {where} or not all {info.world_size} processes "
                    f"joined within {waited:.0f} s (launch.rendezvous_timeout_s={timeout_s}); is the port free, "
                    "and did every task start?")
        else:
            hint = (f"rank {info.rank} could not reach the rendezvous at {where} within {waited:.0f} s "
                    f"(launch.rendezvous_timeout_s={timeout_s}); check MASTER_ADDR/MASTER_PORT (or "
                    "launch.master_addr/master_port), that rank 0 started, and that the port is not firewalled")
        raise LaunchError(f"{info.launcher} launch: {hint}. Underlying error: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from e


def init_distributed(cfg: LaunchConfig, device_request: str = "auto") -> DistContext:
    """Find this process's place (launch/discovery.py) and, when the world has more than one
    process, create the default process group: nccl on CUDA, gloo on CPU."""
    info = discover(cfg)
    device = pick_device(device_request, info.local_rank)
    if info.world_size <= 1:
        return DistContext(device=device, launcher=info.launcher)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise LaunchError("launch.backend: 'nccl' needs CUDA devices; use 'gloo' (or 'auto') on CPU")
    if not dist.is_initialized():
        # torch's flight recorder (a ring of recent collectives) lets launch/watchdog.py name the
        # collective a stuck rank holds up; read by torch when the first process group is made.
        os.environ.setdefault("TORCH_FR_BUFFER_SIZE", FR_BUFFER_SIZE)
        timeout = datetime.timedelta(seconds=collective_timeout_s(cfg.timeout_s))
        device_id = device if device.type == "cuda" else None
        if info.agent_store:
            # torchrun's agent serves the store at MASTER_ADDR:MASTER_PORT; env:// joins it.
            dist.init_process_group(backend=backend, timeout=timeout, device_id=device_id,
                                    rank=info.rank, world_size=info.world_size)
        else:
            store = _rendezvous_store(info, cfg.rendezvous_timeout_s)
            dist.init_process_group(backend=backend, store=store, rank=info.rank, world_size=info.world_size,
                                    timeout=timeout, device_id=device_id)
    return DistContext(rank=info.rank, world_size=info.world_size, local_rank=info.local_rank, device=device,
                       backend=backend, node_rank=info.node_rank, launcher=info.launcher,
                       master_addr=info.master_addr, master_port=info.master_port)


def shutdown(ctx: DistContext) -> None:
    """Barrier, then destroy: leaving with sub-meshes alive aborts the process on exit. Under MPI
    also meet at an MPI barrier so no rank finalizes MPI while another still needs it."""
    if ctx.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if ctx.launcher == "mpi":
        try:
            from mpi4py import MPI
            if MPI.Is_initialized() and not MPI.Is_finalized():
                MPI.COMM_WORLD.Barrier()
        except ImportError:
            pass
