"""`meshformer sweep run --slurm`: scaling/ plans the job arrays and submits them; the script of each
array comes from launch/'s renderer (launch/sbatch.py) and a cluster profile, so a sweep run gets
what a `meshformer slurm` run gets: the profile's nodes x tasks (srun tasks or one torchrun per
node), GPUs, environment and setup lines, SIGUSR1 before the time limit passed on to the trainer,
and a requeue on the trainer's EXIT_PREEMPTED that resumes the run from its checkpoint. This
wiring lives here because scaling/ and launch/ may not import each other.

The profile: `--profile NAME` or the spec's `[slurm] profile`, then the spec's other `[slurm]` keys
(any SlurmProfile key) on top. The sweep sets the job name (`<sweep>-stage<i>`) and the log files
(`<out_dir>/slurm/%A_%a.out`) unless `[slurm]` does. Every process of array task i runs
`python -m trainer sweep exec SPEC --run-list STAGE.runs --run-index i`, which starts the spec's
trainer command; every planned run's layout must fit the profile's nodes x tasks_per_node.
"""
from __future__ import annotations

import dataclasses
import os

from core.errors import ConfigError
from launch.discovery import discover
from launch.sbatch import ARRAY_SLOT, render
from launch.slurm_profile import SlurmProfile, load_profile
from launch.slurm_submit import check_run_config
from scaling.plan import override_args
from scaling.runner import load_plan
from scaling.slurm_arrays import ArrayLauncher, ArrayStage
from scaling.spec import Spec


def sweep_profile(spec: Spec, stage: ArrayStage) -> SlurmProfile:
    table = dict(spec.slurm)
    name = table.pop("profile", None)
    if "module" in table:
        raise ConfigError(f"{spec.path} [slurm] module: a sweep's array tasks run `python -m trainer sweep exec`; "
                          "set the training command with [sweep] trainer instead")
    defaults = {"job_name": f"{spec.name}-stage{stage.index}",
                "output": str(stage.run_list.parent / "%A_%a.out")}
    profile = load_profile(stage.profile or name, {**defaults, **table})
    return dataclasses.replace(profile, module="trainer", sbatch_args=[*profile.sbatch_args, *stage.extra_sbatch])


def render_stage(spec: Spec, stage: ArrayStage) -> str:
    """The array script of one stage; refuses (before queueing) a run whose config is bad or whose
    layout does not fit the profile's world size."""
    profile = sweep_profile(spec, stage)
    plan = load_plan(spec)
    for run_id in stage.run_ids:
        try:
            check_run_config(str(spec.base_config), override_args(plan[run_id]["overrides"]),
                             profile.world_size, profile.mode)
        except ConfigError as e:
            raise ConfigError(f"sweep run {run_id}: {e}") from None
    args = ["sweep", "exec", str(spec.path), "--run-list", str(stage.run_list), "--run-index", ARRAY_SLOT]
    return render(profile, args, job_name=profile.job_name, chdir=os.getcwd(), array=stage.array)


def process_rank() -> int:
    """Rank of this process in its job step (srun task, torchrun worker; 0 when alone)."""
    return discover().rank


LAUNCHER = ArrayLauncher(render=render_stage, rank=process_rank)
