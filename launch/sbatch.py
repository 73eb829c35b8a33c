"""The sbatch script of a run, rendered from a template and a `SlurmProfile`.

The template is a bash script with @@{name} slots (bash keeps every `$`). What it does:
- asks Slurm for SIGUSR1 `signal_seconds` before the time limit; the batch shell traps it and
  forwards it to the training step (USR1 to each trainer, or TERM to each torchrun, which passes
  TERM on to its workers); the trainer checkpoints and stops, and the script requeues the job
  (`scontrol requeue`) so the next run resumes from the run folder's newest checkpoint;
- computes the rendezvous (first node of the allocation, port from the job id) once, for every task;
- job arrays: `--array` adds the #SBATCH line, and `{array_task}` in a trainer argument becomes the
  array index at run time (e.g. --run.dir runs/sweep-{array_task}).
"""
from __future__ import annotations

import shlex
import string
import time

from launch.exit_codes import EXIT_PREEMPTED
from launch.slurm_profile import SlurmProfile

ARRAY_SLOT = "{array_task}"


class _Template(string.Template):
    delimiter = "@@"


TEMPLATE = r"""#!/bin/bash
# Rendered by `meshformer slurm` at @@{rendered_at}.
@@{sbatch_lines}
set -o pipefail

# ---- environment (cluster profile) ----
@@{setup_lines}
@@{env_lines}

# ---- rendezvous: every task meets on the first node of the allocation ----
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
head_addr=$(scontrol show node "$head_node" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
export MASTER_ADDR=${MASTER_ADDR:-${head_addr:-$head_node}}
export MASTER_PORT=${MASTER_PORT:-@@{master_port}}
restarts=${SLURM_RESTART_COUNT:-0}
echo "meshformer: job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# A requeued job resumes: never let run.overwrite move the interrupted run aside.
resume_args=()
[ "$restarts" -gt 0 ] && resume_args=(--run.overwrite false)

# ---- preemption: SIGUSR1 before the time limit -> checkpoint, stop, requeue ----
signalled=0
step_pid=
on_signal() {
  signalled=1
  echo "meshformer: SIGUSR1 at $(date +%T): asking the training step to checkpoint and stop" >&2
  [ -n "$step_pid" ] && kill -s @@{forward_signal} "$step_pid" 2>/dev/null
}
trap on_signal USR1

@@{launch_lines} &
step_pid=$!
[ "$signalled" = 1 ] && kill -s @@{forward_signal} "$step_pid" 2>/dev/null   # came before the step began
while :; do
  wait "$step_pid"; rc=$?
  if [ "$rc" -gt 128 ] && kill -0 "$step_pid" 2>/dev/null; then continue; fi   # a trap ran; still going
  if [ "$rc" -gt 128 ]; then wait "$step_pid" 2>/dev/null; r=$?; [ "$r" -ne 127 ] && rc=$r; fi
  break
done
echo "meshformer: training step ended with exit code $rc"

@@{requeue_lines}
exit "$rc"
"""


REQUEUE_LINES = r"""# Requeue when the step stopped after our signal, or a trainer reports it saved on a signal
# (exit code @@{exit_preempted}, launch/preemption.py) that reached it some other way.
if { [ "$signalled" = 1 ] && [ "$rc" -ne 0 ]; } || [ "$rc" = @@{exit_preempted} ]; then
  if [ "$restarts" -lt @@{max_requeues} ]; then
    echo "meshformer: requeueing job $SLURM_JOB_ID to resume from the newest checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID" && exit 0
    echo "meshformer: scontrol requeue failed; the run can be resumed by submitting it again" >&2
  else
    echo "meshformer: not requeueing: $restarts restarts reached slurm.max_requeues" >&2
  fi
fi"""
NO_REQUEUE_LINES = """# No requeue (slurm.requeue = false): a run stopped by the signal keeps its checkpoint;
# submit it again to resume."""


def _q(arg: str) -> str:
    """Shell-quote, leaving the array-index slot to expand at run time."""
    parts = arg.split(ARRAY_SLOT)
    return '"${SLURM_ARRAY_TASK_ID:-0}"'.join(shlex.quote(p) if p else "" for p in parts) or "''"


def log_dir_pattern(run_dir: str) -> str:
    """A run folder as a Slurm filename pattern: '%' escaped, the array slot as %a (each array
    task's log goes to its own run folder)."""
    return run_dir.replace("%", "%%").replace(ARRAY_SLOT, "%a")


def output_path(p: SlurmProfile, log_dir: str = "", array: str = "") -> str:
    """The job log: the profile's `output`, else <log_dir>/slurm-%j.out (the run folder), else
    slurm-%j.out in the submit folder; in an array, %j becomes %A_%a (one log per task)."""
    if p.output:
        return p.output.replace("%j", "%A_%a") if array and "%a" not in p.output else p.output
    name = "slurm-%A_%a.out" if array else "slurm-%j.out"
    return f"{log_dir.rstrip('/')}/{name}" if log_dir else name


def sbatch_lines(p: SlurmProfile, *, job_name: str, chdir: str, array: str = "", log_dir: str = "") -> list[str]:
    lines = [f"--job-name={job_name}", f"--nodes={p.nodes}", f"--ntasks-per-node={p.tasks_per_node}",
             f"--cpus-per-task={p.cpus_per_task}", f"--time={p.time}", f"--chdir={chdir}",
             f"--output={output_path(p, log_dir, array)}",
             "--open-mode=append"]                     # a requeued job appends to the same log
    if p.gpus_per_node:
        lines.append(f"--gpus-per-node={p.gpus_per_node}")
    for key in ("partition", "account", "qos", "mem"):
        if getattr(p, key):
            lines.append(f"--{key}={getattr(p, key)}")
    if p.signal_seconds:
        lines.append(f"--signal=B:USR1@{p.signal_seconds}")   # B: the batch shell gets it and forwards it
    lines.append("--requeue" if p.requeue else "--no-requeue")
    if array:
        lines.append(f"--array={array}")
    lines += list(p.sbatch_args)
    return ["#SBATCH " + (line if line.startswith("-") else "--" + line) for line in lines]


def launch_lines(p: SlurmProfile, trainer_args: list[str]) -> str:
    srun = ["srun", "--kill-on-bad-exit=1", f"--nodes={p.nodes}", *p.srun_args, *p.container]
    raw: list[str] = []          # words that must expand in the job's shell, written as they are
    if p.mode == "torchrun":
        srun += [f"--ntasks={p.nodes}", "--ntasks-per-node=1", f"--cpus-per-task={p.cpus_per_task * p.tasks_per_node}"]
        prog = [p.python, "-u", "-m", "torch.distributed.run", f"--nnodes={p.nodes}",
                f"--nproc-per-node={p.tasks_per_node}", "--rdzv-backend=c10d"]
        raw = ['"--rdzv-endpoint=$MASTER_ADDR:$MASTER_PORT"', '"--rdzv-id=$SLURM_JOB_ID"', "-m", _q(p.module)]
    else:
        srun += [f"--ntasks={p.world_size}", f"--ntasks-per-node={p.tasks_per_node}",
                 f"--cpus-per-task={p.cpus_per_task}"]
        prog = [p.python, "-u", "-m", p.module]
    lines = [" ".join(map(_q, srun)), " ".join([*map(_q, prog), *raw]),
             " ".join(_q(a) for a in trainer_args) + ' ${resume_args[@]+"${resume_args[@]}"}']
    return " \\\n  ".join(lines)


def render(p: SlurmProfile, trainer_args: list[str], *, job_name: str, chdir: str, array: str = "",
           template: str = TEMPLATE, log_dir: str = "") -> str:
    """log_dir: where the job log goes when the profile sets no `output` (a Slurm filename
    pattern: see log_dir_pattern); Slurm does not create it, the submitter must."""
    env = {"OMP_NUM_THREADS": str(p.cpus_per_task), **{k: str(v) for k, v in p.env.items()}}
    if p.gpus_per_node:
        env.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")   # a failed NCCL op raises instead of hanging
    if p.mode == "torchrun" and p.signal_seconds:
        # torchrun gives its workers 30 s after forwarding TERM, then SIGKILL: too short for a large
        # checkpoint (launch/README.md). The job has signal_seconds left: let the save use them.
        # (An environment variable, not --shutdown-timeout: torchrun without it ignores the variable.)
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(p.signal_seconds))
    return _Template(template).substitute(
        rendered_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        sbatch_lines="\n".join(sbatch_lines(p, job_name=job_name, chdir=chdir, array=array, log_dir=log_dir)),
        setup_lines="\n".join(p.setup) or "# (no setup lines)",
        env_lines="\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()),
        master_port=str(p.master_port) if p.master_port else "$((20000 + SLURM_JOB_ID % 10000))",
        forward_signal="TERM" if p.mode == "torchrun" else "USR1",
        # requeue, exit_preempted, max_requeues: slots of templates written for older versions
        requeue_lines=_Template(REQUEUE_LINES if p.requeue else NO_REQUEUE_LINES).substitute(
            exit_preempted=str(EXIT_PREEMPTED), max_requeues=str(p.max_requeues)),
        requeue="yes" if p.requeue else "no", exit_preempted=str(EXIT_PREEMPTED), max_requeues=str(p.max_requeues),
        launch_lines=launch_lines(p, trainer_args))
