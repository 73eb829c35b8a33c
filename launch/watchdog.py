"""Name the rank that stops making progress instead of hanging on it.

A rank can stop without dying: a deadlock, a hung filesystem, a GPU that stops answering, a
debugger. The other ranks then wait inside a collective. On gloo that collective gives up after
its process group's timeout with `Timed out waiting 300000ms for recv operation to complete`
(no rank, no collective), and DeviceMesh sub-groups (where FSDP and TP talk) get torch's default
of 30 minutes, not `launch.timeout_s`. On NCCL, torch's watchdog thread aborts the communicator
after the timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default) and, with the flight recorder
on, can dump traces for `torchfrtrace`; it too says which collective timed out on this rank, not
which rank is missing.

What this adds, the same on both backends: the loop calls `beat(step)` after every step (a clock
read). A daemon thread wakes every few seconds; once this rank has gone `launch.timeout_s`
without progress it writes a report to the rendezvous store (its last step and, from torch's
flight recorder, the newest collective it entered on each process group and whether that one
finished), waits a few seconds for the other ranks' reports, names the rank(s) that the others
wait for and the collective they have not joined, and ends the process with EXIT_STALLED so the
launcher restarts the job from its last checkpoint (torchrun --max-restarts, Slurm requeue).
A thread and the store because the waiting ranks sit in a collective that Python cannot
interrupt, and the store is a separate TCP connection that still answers. The flight recorder
(TORCH_FR_BUFFER_SIZE, set by launch/context.py before the process group exists) is torch's own
record of each collective: name, process group, sequence number; its JSON dump is safe to take
from another thread while a collective is pending.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import sys
import threading
import time

import torch.distributed as dist

try:        # torch's flight-recorder dump: private (checked on 2.13); where absent, reports name no collective
    from torch._C._distributed_c10d import _dump_fr_trace_json
except ImportError:
    _dump_fr_trace_json = None

EXIT_STALLED = 70          # EX_SOFTWARE in sysexits.h; torchrun restarts on any non-zero exit
FR_BUFFER_SIZE = "2000"    # collectives remembered per process (the size torch's flight-recorder docs suggest)


def collective_timeout_s(timeout_s: float) -> float:
    """The process groups' own timeout: long enough that the watchdog (timeout_s, then a few
    seconds for the reports) always speaks first; it still ends a wait where no watchdog runs
    (start-up, the final save)."""
    return 2 * timeout_s + 30


@contextlib.contextmanager
def stall_watchdog(ctx, timeout_s: float):
    """Yields `beat(step)` for the training loop; a watchdog runs behind it in a multi-process
    job. `beat(None)` disarms it (the loop is over)."""
    if not ctx.distributed or not ctx.master_addr:
        yield lambda step: None
        return
    dog = StallWatchdog(ctx, ctx.master_addr, ctx.master_port, timeout_s)
    try:
        yield dog.beat
    finally:
        dog.close()


def flight_record() -> dict[str, list]:
    """{process group: [newest collective sequence number, its name, finished?]} from torch's
    flight recorder; {} where the recorder is off or this torch has none."""
    if _dump_fr_trace_json is None:
        return {}
    try:
        trace = json.loads(_dump_fr_trace_json(True, True))
    except (RuntimeError, ValueError):
        return {}
    status = trace.get("pg_status", {})
    groups: dict[str, list] = {}
    for e in trace.get("entries", []):
        if e.get("is_p2p"):
            continue
        name = "/".join(x for x in e.get("process_group", []) if x) or str(e.get("pg_id"))
        seq = int(e.get("collective_seq_id", 0))
        if seq >= groups.get(name, [-1])[0]:
            done = int(status.get(str(e.get("pg_id")), {}).get("last_completed_collective", -1)) >= seq
            groups[name] = [seq, e.get("profiling_name", "?"), done]
    return groups


def _ranks(rs) -> str:
    rs = sorted(rs)
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))


def diagnose(reports: dict[int, dict], world_size: int) -> tuple[list[int], str]:
    """(stuck ranks, one sentence) from each answering rank's report: {"step", "groups"}.
    A rank is behind on a group when others entered a later collective there; the stuck ones are
    those behind that are not themselves waiting in an unfinished collective (a rank that waits
    for a stuck peer on one group is behind on the next group too). Silent ranks are stuck."""
    silent = [r for r in range(world_size) if r not in reports]
    behind: dict[int, list[str]] = {}
    for name in sorted({g for rep in reports.values() for g in rep.get("groups", {})}):
        seqs = {r: rep["groups"][name] for r, rep in reports.items() if name in rep.get("groups", {})}
        top = max(s[0] for s in seqs.values())
        late = [r for r, s in seqs.items() if s[0] < top]
        if late:
            op = next(s[1] for s in seqs.values() if s[0] == top)
            waiting = [r for r, s in seqs.items() if s[0] == top]
            for r in late:
                behind.setdefault(r, []).append(f"{op} #{top} on process group {name} ({_ranks(waiting)} waiting in it)")
    waits = {r for r, rep in reports.items() if any(not g[2] for g in rep.get("groups", {}).values())}
    stuck = [r for r in behind if r not in waits] or list(behind)
    parts = [f"{_ranks([r])} has not joined {' and '.join(behind[r])}, last finished step {reports[r].get('step')}"
             for r in sorted(stuck)]
    if silent:
        parts.append(f"{_ranks(silent)} did not answer at all (frozen, or its host is gone)")
    if not parts:
        steps = {r: rep.get("step") for r, rep in reports.items()}
        low = min(steps.values())
        stuck = [r for r, s in steps.items() if s == low] if len(set(steps.values())) > 1 else []
        parts.append(f"{_ranks(stuck)} last finished step {low}, the others later" if stuck else
                     f"every rank last finished step {low}; no rank is behind in a collective that the "
                     "flight recorder saw (a step slower than launch.timeout_s, or the recorder is off: TORCH_FR_BUFFER_SIZE)")
    return sorted(stuck + silent), "; ".join(parts)


class StallWatchdog:
    """Stops this process with a report naming the stuck rank(s) when the loop's beats stop for
    `timeout_s`. Armed by the first beat (the first step may compile for a long time)."""

    def __init__(self, ctx, master_addr: str, master_port: int, timeout_s: float, *,
                 poll_s: float | None = None, answer_s: float | None = None, exit_fn=os._exit):
        self.ctx, self.timeout_s = ctx, timeout_s
        self.poll_s = poll_s or max(0.2, min(5.0, timeout_s / 10))
        self.answer_s = answer_s or max(2.0, min(30.0, timeout_s / 5))   # how long to wait for the others' reports
        self.exit_fn = exit_fn
        self.step, self.last = None, time.monotonic()
        attempt = f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        client = dist.TCPStore(master_addr, master_port, is_master=False,
                               timeout=datetime.timedelta(seconds=max(10.0, self.answer_s)))
        self.store = dist.PrefixStore(f"meshformer/stall/{attempt}/", client)   # a restart's keys start empty
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step: int | None) -> None:
        self.step, self.last = step, time.monotonic()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            idle = time.monotonic() - self.last
            if self.step is not None and idle > self.timeout_s:
                line = self.report(idle)
                if line:
                    print(line, file=sys.stderr, flush=True)
                sys.stdout.flush()
                self.exit_fn(EXIT_STALLED)
                return

    def report(self, idle: float) -> str:
        """Publish this rank's view, gather the others', and return the line to print ("" on
        every rank but the lowest waiting one, so a job prints it once)."""
        rank, world = self.ctx.rank, self.ctx.world_size
        mine = {"step": self.step, "groups": flight_record()}
        try:
            self.store.set(str(rank), json.dumps(mine))
            keys = [str(r) for r in range(world)]
            deadline = time.monotonic() + self.answer_s
            while not self.store.check(keys) and time.monotonic() < deadline:
                time.sleep(0.2)
            reports = {r: json.loads(self.store.get(str(r))) for r in range(world) if self.store.check([str(r)])}
        except (RuntimeError, ValueError) as e:      # the store's host is gone too: say what this rank knows
            waiting = "; ".join(f"{g[1]} #{g[0]} on process group {n}" for n, g in mine["groups"].items() if not g[2])
            return (f"launch error: rank {rank}: no progress for {idle:.0f} s (launch.timeout_s={self.timeout_s:g}) "
                    f"after step {self.step}" + (f", waiting in {waiting}" if waiting else "")
                    + f"; the rendezvous store did not answer ({str(e).splitlines()[0] if str(e) else type(e).__name__}), "
                    f"so the other ranks' state is unknown; stopping with exit code {EXIT_STALLED}")
        stuck, why = diagnose(reports, world)
        printer = min((r for r in reports if r not in stuck), default=min(reports, default=rank))
        if rank != printer:
            return ""
        return (f"launch error: no progress for {idle:.0f} s (launch.timeout_s={self.timeout_s:g}): {why}; "
                f"stopping with exit code {EXIT_STALLED} so the launcher restarts the job from its last checkpoint")
