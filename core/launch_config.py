"""How processes find each other: the `[launch]` config section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option

LAUNCHERS = ("auto", "torchrun", "slurm", "mpi", "none")


@dataclass
class LaunchConfig:
    launcher: Literal["auto", "torchrun", "slurm", "mpi", "none"] = option("where rank and world come from: auto = torchrun/accelerate variables, else MPI (mpiexec), "
        "else an srun step's SLURM_* variables, else one process; or force one of them "
        "(none = always a single process)", "auto")
    backend: Literal["auto", "gloo", "nccl"] = option("process-group backend; auto = nccl on CUDA, gloo on CPU", "auto")
    timeout_s: int = option("seconds a rank may go without finishing a step (with its evaluation and save) before "
        "the job stops, naming the stuck rank(s) and the collective they hold up (launch/watchdog.py); collectives "
        "themselves give up at 2x + 30 s", 300)
    rendezvous_timeout_s: int = option("seconds to wait for all processes to reach the rendezvous (MASTER_ADDR:MASTER_PORT) before a clear error", 120)
    master_addr: str = option("rendezvous host for Slurm/MPI launches; empty = $MASTER_ADDR, else the first host of the job "
        "(Slurm) or rank 0's host (MPI)", "")
    master_port: int = option("rendezvous port for Slurm/MPI launches; 0 = $MASTER_PORT, else 20000 + job id mod 10000 (Slurm) "
        "or a free port chosen by rank 0 (MPI)", 0)
    accelerate_config: str = option("an accelerate config YAML (what `accelerate config` writes) whose mixed_precision, "
        "fsdp_config and parallelism_config set the keys this run config leaves unset (core/accelerate_config.py); "
        "empty = under `accelerate launch`, what it exported to the processes", "")

    def validate(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ValueError(f"launch.launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.timeout_s < 1:
            raise ValueError(f"launch.timeout_s: must be >= 1 second, got {self.timeout_s}")
        if self.rendezvous_timeout_s < 1:
            raise ValueError(f"launch.rendezvous_timeout_s: must be >= 1 second, got {self.rendezvous_timeout_s}")
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"launch.master_port: must be 0 (derive) or a port 1-65535, got {self.master_port}")
