"""Execute the runs of a sweep: one run (`execute_run`, what a local worker or each process of a
Slurm array task does) or many locally, k at a time, branches only after their base run finished.

A run's record lives in the results store; `plan.json` in the sweep folder holds every run's
trainer overrides so that an array task needs nothing but the spec path and its run id.

A run that stopped on a signal after saving (Slurm's time-limit warning, preemption) is recorded
as `preempted` and resumes from its newest checkpoint when it starts again (a requeued array task,
or the next `sweep run`), instead of starting over."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from .plan import Run, override_args, plan_sweep
from .spec import Spec
from .store import ResultsStore


def write_plan(spec: Spec, runs: list[Run]) -> ResultsStore:
    """Record the plan (plan.json) and register every run in the store (finished ones keep their
    result unless their config changed)."""
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    (spec.out_dir / "plan.json").write_text(json.dumps([r.store_row() for r in runs], indent=1))
    store = ResultsStore(spec.results_path)
    for r in runs:
        store.register(r.store_row())
    return store


def load_plan(spec: Spec) -> dict[str, dict]:
    path = spec.out_dir / "plan.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `sweep plan` or `sweep run` for this spec first")
    return {r["run_id"]: r for r in json.loads(path.read_text())}


def _alive(row: dict) -> bool:
    """A 'running' record whose process is gone on this host is a lost run (killed, machine
    restarted); one on another host (a Slurm node) is trusted."""
    if row["host"] != socket.gethostname() or not row["pid"]:
        return True
    try:
        os.kill(row["pid"], 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def effective_status(row: dict) -> str:
    if row["status"] == "running" and not _alive(row):
        return "lost"
    if row["status"] == "done" and not (Path(row["run_dir"]) / "summary.json").exists():
        return "pending"     # the record says done but the run folder is gone: redo it
    return row["status"]


def select_runs(spec: Spec, runs: list[Run], store: ResultsStore, retry_failed: bool) -> list[Run]:
    """Runs still to execute: pending, lost and preempted ones (these resume), failed ones when
    asked; never done or live."""
    wanted = {"pending", "lost", "preempted"} | ({"failed"} if retry_failed else set())
    rows = {r["run_id"]: r for r in store.rows()}
    return [r for r in runs if effective_status(rows[r.run_id]) in wanted]


def trainer_command(spec: Spec, run: dict) -> list[str]:
    cmd = list(spec.trainer)
    if cmd and cmd[0] == "python":
        cmd[0] = sys.executable
    return cmd + ["--config", str(spec.base_config)] + override_args(run["overrides"])


def _check_branch(run: dict) -> str | None:
    """The branch must really have started from its checkpoint: no metrics row at or before it."""
    start = run["steps_planned"] - int(run["overrides"]["optim.decay_steps"])
    metrics = Path(run["run_dir"]) / "metrics.jsonl"
    steps = [json.loads(line).get("step", 0) for line in metrics.read_text().splitlines() if line.strip()] \
        if metrics.exists() else []
    if steps and min(steps) <= start:
        return (f"branch logged step {min(steps)} <= its checkpoint step {start}: the trainer did not "
                "start from checkpoint.init_from (is it implemented?)")
    return None


# The trainer's run-folder names (trainer/checkpoint.py, checkpoint_files.py), restated so that a
# sweep does not import torch to look at a folder; tests/scaling/test_sweep_sbatch.py checks them.
COMPLETE_MARKER, PREEMPTED_MARKER = "COMPLETE", "PREEMPTED"
# Signals that ask a run to stop: Slurm's warning (USR1, from the batch script through srun),
# TERM (scancel, torchrun's shutdown), INT. A wrapper passes them on instead of dying of them.
FORWARDED = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def has_checkpoint(run_dir: Path) -> bool:
    return any((run_dir / "checkpoints").glob(f"step-*/{COMPLETE_MARKER}"))


def start_over(run_dir: Path, resume: bool) -> bool:
    """Whether the trainer must move an existing run aside (run.overwrite) instead of resuming it.
    It resumes when it can (a complete checkpoint) and should: a restarted Slurm task (`resume`)
    or a run that saved on a signal (the trainer's PREEMPTED marker). Decided from the folder and
    the flag only, so every process of a multi-process run decides the same."""
    if not (run_dir.exists() and any(run_dir.iterdir())):
        return False
    return not (has_checkpoint(run_dir) and (resume or (run_dir / PREEMPTED_MARKER).exists()))


def call_forwarding_signals(cmd: list[str], **popen) -> int:
    """Run `cmd` and return its exit code (128 + N when signal N ended it, as a shell reports it).
    The stop signals are passed on to it: a signal sent to this wrapper must reach the trainer,
    which checkpoints and exits with its own code. (Only the main thread may set handlers; local
    worker threads need none: Ctrl-C reaches the whole process group.)"""
    if threading.current_thread() is not threading.main_thread():
        rc = subprocess.call(cmd, **popen)
        return 128 - rc if rc < 0 else rc
    proc, pending = None, []

    def forward(signum, frame):
        if proc is None:
            pending.append(signum)            # arrived before the child exists: send it once it does
        else:
            proc.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED}
    try:
        proc = subprocess.Popen(cmd, **popen)
        for signum in pending:
            proc.send_signal(signum)
        rc = proc.wait()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 128 - rc if rc < 0 else rc


def execute_run(spec: Spec, run_id: str, store: ResultsStore | None = None, *, record: bool = True,
                resume: bool = False) -> int:
    """Run one planned run with the trainer; returns 0 when it is done, else the trainer's exit
    code (the requeue code after a signal-triggered checkpoint) or 1.

    record: this process keeps the run's record in the store and its log (the first process of a
    multi-process run; the others only run the trainer, whose output goes to the job's log).
    resume: a restart of an interrupted run (a requeued Slurm task): resume from its checkpoint."""
    run = load_plan(spec)[run_id]
    if record:
        store = store or ResultsStore(spec.results_path)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if record:
        store.mark_running(run_id, f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else None)
    run_dir = Path(run["run_dir"])
    init = run["overrides"].get("checkpoint.init_from")
    if init and not Path(init).is_dir():
        if record:
            store.mark_failed(run_id, f"checkpoint {init} of base run {run['parent']} is missing "
                                      "(did the base run finish?)")
        return 1
    ov = dict(run["overrides"])
    if start_over(run_dir, resume):
        ov["run.overwrite"] = True    # a retried or changed run starts over; the old one is moved aside
    elif record:
        (run_dir / "summary.json").unlink(missing_ok=True)   # an interrupted attempt's: not this run's result
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    cmd = trainer_command(spec, {**run, "overrides": ov})
    if not record:
        return call_forwarding_signals(cmd, env=env)
    log_path = run_dir.parent / f"{run_id}.log"
    with log_path.open("a") as log:      # appended: a requeued run's log follows its first attempt's
        log.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {'slurm job ' + job if job else 'here'}: "
                  f"{' '.join(cmd)}\n")
        log.flush()
        rc = call_forwarding_signals(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    if summary and summary.get("preempted"):
        store.mark_preempted(run_id, f"stopped on a signal at step {summary.get('steps')} after saving a checkpoint "
                                     f"(exit {rc}); it resumes from there when it runs again")
        return rc or 1
    if rc != 0 or summary is None:
        tail = log_path.read_text()[-1500:]
        store.mark_failed(run_id, f"trainer exited with {rc}; log {log_path}:\n{tail}")
        return rc or 1
    problem = _check_branch(run) if run["kind"] == "branch" else None
    if problem:
        store.mark_failed(run_id, problem)
        return 1
    store.mark_done(run_id, summary)
    return 0


def run_local(spec: Spec, jobs: int = 1, retry_failed: bool = False, log=print) -> dict:
    """Execute what is left of the sweep here, `jobs` runs at a time. Returns the status counts."""
    runs = plan_sweep(spec)
    store = write_plan(spec, runs)
    todo = select_runs(spec, runs, store, retry_failed)
    skipped = len(runs) - len(todo)
    log(f"{len(todo)} runs to execute, {skipped} skipped (done, running or failed)")
    waiting = {r.run_id: r for r in todo}
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        active = {}
        while waiting or active:
            for rid, r in list(waiting.items()):
                if len(active) >= jobs:
                    break
                if r.parent in waiting or r.parent in active.values():
                    continue       # its base run is still to finish here
                del waiting[rid]
                active[pool.submit(execute_run, spec, rid, store)] = rid
            if not active:
                break
            done, _ = wait(active, return_when=FIRST_COMPLETED)
            for f in done:
                rid = active.pop(f)
                rc = f.result()
                log(f"  {rid}: {'done' if rc == 0 else 'PREEMPTED' if store.get(rid)['status'] == 'preempted' else 'FAILED'}")
    return store.counts()
