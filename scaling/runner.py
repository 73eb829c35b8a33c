"""Execute the runs of a sweep: one run (`execute_run`, what a local worker or a Slurm array task
does) or many locally, k at a time, branches only after their base run finished.

A run's record lives in the results store; `plan.json` in the sweep folder holds every run's
trainer overrides so that an array task needs nothing but the spec path and its run id."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
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
    """Runs still to execute: pending and lost ones, failed ones when asked; never done or live."""
    wanted = {"pending", "lost"} | ({"failed"} if retry_failed else set())
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


def execute_run(spec: Spec, run_id: str, store: ResultsStore | None = None) -> bool:
    """Run one planned run with the trainer and record the outcome. Returns True when done."""
    run = load_plan(spec)[run_id]
    store = store or ResultsStore(spec.results_path)
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    store.mark_running(run_id, f"{job}_{os.environ.get('SLURM_ARRAY_TASK_ID')}" if job else None)
    run_dir = Path(run["run_dir"])
    init = run["overrides"].get("checkpoint.init_from")
    if init and not Path(init).is_dir():
        store.mark_failed(run_id, f"checkpoint {init} of base run {run['parent']} is missing "
                                  "(did the base run finish?)")
        return False
    ov = dict(run["overrides"])
    if run_dir.exists() and any(run_dir.iterdir()):
        ov["run.overwrite"] = True    # a retried or changed run starts over; the old one is moved aside
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    log_path = run_dir.parent / f"{run_id}.log"
    with log_path.open("w") as log:
        rc = subprocess.call(trainer_command(spec, {**run, "overrides": ov}), stdout=log,
                             stderr=subprocess.STDOUT, env=env)
    summary_path = run_dir / "summary.json"
    if rc != 0 or not summary_path.exists():
        tail = log_path.read_text()[-1500:]
        store.mark_failed(run_id, f"trainer exited with {rc}; log {log_path}:\n{tail}")
        return False
    problem = _check_branch(run) if run["kind"] == "branch" else None
    if problem:
        store.mark_failed(run_id, problem)
        return False
    store.mark_done(run_id, json.loads(summary_path.read_text()))
    return True


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
                log(f"  {rid}: {'done' if f.result() else 'FAILED'}")
    return store.counts()
