"""`meshformer slurm`: render a run's sbatch script, print it (--dry-run) or submit it (--wait
blocks until the job, requeues included, has ended and returns its exit status).

    meshformer slurm --config configs/tiny.toml --profile local --nodes 2 --tasks-per-node 2 --dry-run
    meshformer slurm --config FILE --profile example-ib --nodes 4 --time 12:00:00 --wait --optim.lr 3e-4

Arguments this command does not know (--section.key value) are trainer overrides: they are
checked here, before anything is queued, and passed to every task.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from core.cli_args import ArgParser
from core.errors import ConfigError, UsageError, report_errors
from core.layout import resolve_sizes
from core.run_config import keys_help, load_config
from launch.sbatch import ARRAY_SLOT, TEMPLATE, log_dir_pattern, render
from launch.slurm_profile import load_profile


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="meshformer slurm", allow_abbrev=False,
                                description="Render or submit an sbatch script that trains --config on a Slurm cluster.",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other --section.key value pairs override the run config, e.g. --optim.lr 3e-4.\n\n"
                                       + keys_help())
    p.add_argument("--config", default=None, help="run config TOML (default: built-in defaults)")
    p.add_argument("--profile", default=None,
                   help="cluster profile: a TOML path or a name in configs/slurm/ or configs/clusters/ (its [slurm] table)")
    g = p.add_argument_group("profile keys (override the profile)")
    g.add_argument("--nodes", type=int)
    g.add_argument("--tasks-per-node", type=int, help="training processes per node (= GPUs per node)")
    g.add_argument("--gpus-per-node", type=int)
    g.add_argument("--cpus-per-task", type=int)
    g.add_argument("--partition")
    g.add_argument("--account")
    g.add_argument("--qos")
    g.add_argument("--time", help="time limit, e.g. 30, 04:00:00, 1-00:00:00")
    g.add_argument("--mode", choices=["tasks", "torchrun"], help="one srun task per GPU, or one torchrun per node")
    g.add_argument("--signal-seconds", type=int, help="SIGUSR1 this long before the time limit (checkpoint + requeue)")
    g.add_argument("--requeue", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--job-name")
    g.add_argument("--output", help="job log path (%%j = job id; default: <run.dir>/slurm-%%j.out, "
                                    "the run folder, made at submit time)")
    g.add_argument("--python", help="Python on the nodes (default: python)")
    g.add_argument("--module", help="module each task runs (default: trainer)")
    p.add_argument("--array", default="", help="job array indices, e.g. 0-7 or 0-15%%4; '{array_task}' in an "
                                               "override becomes the index (--run.dir runs/s-{array_task})")
    p.add_argument("--template", default=None, help="your own template file with the @@{...} slots of the built-in one")
    p.add_argument("--script-out", default=None, help="also write the script to this file")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    mode.add_argument("--wait", action="store_true", help="block until the job ends; exit with its exit status")
    return p


def _profile_overrides(args) -> dict:
    keys = ("nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task", "partition", "account", "qos", "time",
            "mode", "signal_seconds", "requeue", "job_name", "output", "python", "module")
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def check_run_config(config: str | None, overrides: list[str], world: int, mode: str):
    """Fail before queueing: a bad config or a layout that does not fit the job's world size
    would otherwise only show after the job waited its turn."""
    cfg = load_config(config, overrides)
    try:
        resolve_sizes(cfg.parallel, world)
    except ConfigError as e:
        raise ConfigError(f"{e} (this job starts nodes x tasks_per_node = {world} processes)") from None
    wanted = {"tasks": "slurm", "torchrun": "torchrun"}[mode]
    if cfg.launch.launcher not in ("auto", wanted):
        raise ConfigError(f"launch.launcher: {cfg.launch.launcher!r} contradicts slurm.mode={mode!r}, which starts "
                          f"the trainer through {wanted}; use 'auto' or {wanted!r}")
    return cfg


# Slurm's --array syntax: indices, ranges with an optional step, commas, an optional %throttle.
ARRAY_SPEC = re.compile(r"\d+(-\d+(:\d+)?)?(,\d+(-\d+(:\d+)?)?)*(%\d+)?")


def array_indices(spec: str) -> list[int]:
    """The task indices of a Slurm --array spec (ARRAY_SPEC-checked): '0-6:2,9%2' -> [0, 2, 4, 6, 9]."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out += range(int(lo), int(hi or lo) + 1, int(step or 1))
    return out


def make_log_dirs(run_dir: str, array: str) -> None:
    """Slurm opens the job log before the job starts and does not create folders: make the run
    folder (one per array task when run.dir holds the task slot) now, at submit time."""
    dirs = ([run_dir.replace(ARRAY_SLOT, str(i)) for i in array_indices(array)]
            if array and ARRAY_SLOT in run_dir else [run_dir.replace(ARRAY_SLOT, "0")])
    for d in dirs:
        try:
            Path(d).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run.dir: cannot create {d} for the job log ({e.strerror}); pick a writable "
                              "run.dir, or set --output to a log file elsewhere") from None


def _read_template(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise UsageError(f"--template {path}: cannot read it ({e.strerror}); give a file with the @@{{...}} "
                         "slots of the built-in template") from None


def main(argv: list[str] | None = None, debug: bool = False) -> int:
    """Raises MeshformerError (the `meshformer` CLI prints it as one line); see __main__ below."""
    args, overrides = build_parser().parse_known_args(argv)
    if args.array and not ARRAY_SPEC.fullmatch(args.array):
        raise UsageError(f"--array: {args.array!r} is not a Slurm array spec; use e.g. 0-7, 1,3,5 or 0-15%4")
    stray = [a for a in overrides if a.startswith("-") and not a.startswith("--")]
    if stray:
        raise ConfigError(f"unknown option {stray[0]!r}; see meshformer slurm --help")
    profile = load_profile(args.profile, _profile_overrides(args))
    if args.config and not Path(args.config).is_file():
        raise ConfigError(f"config file {args.config!r} not found")
    cfg = check_run_config(args.config, overrides, profile.world_size, profile.mode)
    trainer_args = (["--config", os.path.abspath(args.config)] if args.config else []) + list(overrides)
    template = _read_template(args.template) if args.template else TEMPLATE
    run_dir = os.path.abspath(cfg.run.dir)        # the job's log goes there unless --output says otherwise
    script = render(profile, trainer_args, job_name=profile.job_name or f"meshformer-{Path(cfg.run.dir).name}",
                    chdir=os.getcwd(), array=args.array, template=template, log_dir=log_dir_pattern(run_dir))
    if args.script_out:
        try:
            Path(args.script_out).write_text(script)
        except OSError as e:
            raise UsageError(f"--script-out {args.script_out}: cannot write it ({e.strerror}); give a path in an "
                             "existing folder") from None
    if args.dry_run:
        sys.stdout.write(script)
        return 0
    if not profile.output:
        make_log_dirs(run_dir, args.array)
    if not shutil.which("sbatch"):
        raise ConfigError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run to print the script")
    cmd = ["sbatch", *(["--wait"] if args.wait else [])]
    done = subprocess.run(cmd, input=script, text=True)     # sbatch reads the script from stdin
    if done.returncode and not args.wait:
        print(f"meshformer slurm: sbatch failed with exit code {done.returncode}", file=sys.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(report_errors("meshformer slurm", main))
