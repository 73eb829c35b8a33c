"""Submit the runs of a sweep as Slurm job arrays: one array task per run, at most k at a time
(`--array=0-(n-1)%k`). Branches go in a second array that starts after the first ends
(`--dependency=afterany`, so one failed base run does not cancel every other branch; a branch
whose checkpoint is missing fails on its own with that reason).

The script of each array is not written here: it comes from the launcher layer (launch/sbatch.py
with a cluster profile, wired in by trainer/sweep_slurm.py, since scaling/ may not import launch/),
so a sweep run gets what a single `meshformer slurm` run gets: the profile's nodes, tasks and GPUs,
the time-limit signal passed on to the trainer, and a requeue that resumes from the checkpoint.
Every process of array task i runs `meshformer sweep exec SPEC --run-list STAGE.runs --run-index i`:
the i-th line of the stage's run list is its run; the first process records it in the store."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .plan import Run
from .spec import Spec


@dataclass(frozen=True)
class ArrayStage:
    """One job array: the runs of a stage, listed one per line in `run_list`."""
    index: int
    run_ids: tuple
    run_list: Path
    throttle: int
    extra_sbatch: tuple = ()
    profile: str | None = None         # a cluster profile name or path; None: the spec's [slurm] profile

    @property
    def array(self) -> str:
        return f"0-{len(self.run_ids) - 1}%{max(1, self.throttle)}"


@dataclass(frozen=True)
class ArrayLauncher:
    """What scaling/ needs from the launcher layer, handed down by the command above it."""
    render: Callable[[Spec, ArrayStage], str]     # the sbatch script of one stage
    rank: Callable[[], int]                       # this process's rank in its job step (0 keeps the record)


def read_run_list(path: str | Path, index: int) -> str:
    ids = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not 0 <= index < len(ids):
        raise ValueError(f"--run-index {index} is outside the {len(ids)} runs of {path}")
    return ids[index]


def submit_arrays(spec: Spec, runs: list[Run], throttle: int, launcher: ArrayLauncher, wait: bool = False,
                  extra_sbatch: list[str] = (), profile: str | None = None, log=print) -> list[str]:
    """sbatch one array per stage; returns the job ids. wait=True blocks until the last ends."""
    folder = spec.out_dir.resolve() / "slurm"
    folder.mkdir(parents=True, exist_ok=True)
    stages = [[r.run_id for r in runs if r.stage == s] for s in (0, 1)]
    stages = [s for s in stages if s]
    job_ids: list[str] = []
    for i, ids in enumerate(stages):
        stage = ArrayStage(i, tuple(ids), folder / f"array-stage{i}.runs", throttle, tuple(extra_sbatch), profile)
        stage.run_list.write_text("".join(f"{r}\n" for r in ids))
        script = folder / f"array-stage{i}.sbatch"
        script.write_text(launcher.render(spec, stage))
        cmd = ["sbatch", "--parsable"]
        if job_ids:
            cmd.append(f"--dependency=afterany:{job_ids[-1]}")
        if wait and i == len(stages) - 1:
            cmd.append("--wait")
        cmd.append(str(script))
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        except FileNotFoundError:
            raise RuntimeError("sbatch not found: is Slurm installed and on PATH?") from None
        if out.returncode != 0 and not (wait and out.stdout.strip()):
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        job_ids.append(out.stdout.strip().split(";")[0].splitlines()[0])
        log(f"submitted stage {i}: {len(ids)} runs as array job {job_ids[-1]} ({script})")
    return job_ids
