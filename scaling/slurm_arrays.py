"""Submit the runs of a sweep as Slurm job arrays: one array task per run, at most k at a time
(`--array=0-(n-1)%k`). Branches go in a second array that starts after the first ends
(`--dependency=afterany`, so one failed base run does not cancel every other branch; a branch
whose checkpoint is missing fails on its own with that reason). Each task runs
`python -m scaling exec SPEC --run-id ID`, which records its outcome in the results store."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from .plan import Run
from .spec import Spec


def render_array_script(spec: Spec, run_ids: list[str], stage: int, throttle: int,
                        extra_sbatch: list[str] = ()) -> str:
    if not run_ids:
        raise ValueError("an array needs at least one run")
    logs = (spec.out_dir / "slurm").resolve()
    lines = ["#!/bin/bash",
             f"#SBATCH --job-name={spec.name}-stage{stage}",
             f"#SBATCH --array=0-{len(run_ids) - 1}%{max(1, throttle)}",
             f"#SBATCH --output={logs}/%A_%a.out",
             "#SBATCH --ntasks=1",
             "#SBATCH --cpus-per-task=1",
             f"#SBATCH --chdir={Path.cwd()}",
             *(f"#SBATCH {a}" for a in extra_sbatch),
             "set -euo pipefail",
             f"RUN_IDS=({' '.join(shlex.quote(r) for r in run_ids)})",
             f"export PYTHONPATH={shlex.quote(str(Path.cwd()))}${{PYTHONPATH:+:$PYTHONPATH}}",
             f"exec {shlex.quote(sys.executable)} -m scaling exec {shlex.quote(str(spec.path))} "
             '--run-id "${RUN_IDS[$SLURM_ARRAY_TASK_ID]}"', ""]
    return "\n".join(lines)


def submit_arrays(spec: Spec, runs: list[Run], throttle: int, wait: bool = False,
                  extra_sbatch: list[str] = (), log=print) -> list[str]:
    """sbatch one array per stage; returns the job ids. wait=True blocks until the last ends."""
    (spec.out_dir / "slurm").mkdir(parents=True, exist_ok=True)
    stages = [[r.run_id for r in runs if r.stage == s] for s in (0, 1)]
    stages = [s for s in stages if s]
    job_ids: list[str] = []
    for i, ids in enumerate(stages):
        script = spec.out_dir / "slurm" / f"array-stage{i}.sbatch"
        script.write_text(render_array_script(spec, ids, i, throttle, extra_sbatch))
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
