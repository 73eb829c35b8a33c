"""One launch of `meshformer plan calibrate`: every rank of the user's cluster times a few short real
training runs, one per layout, in the same processes (start-up costs more than the runs).

Run by `trainer/calibrate.py` as
  torchrun --nproc_per_node N -m trainer.calibrate_worker OUT.json ROUNDS NAME=ARGS ...
where ARGS are the run-config arguments of one layout (`--config FILE --parallel.tp 2 ...`).
Each layout trains `train.steps` steps; its figure is the median of the per-step tokens/s the
trainer logs, the first `WARMUP_STEPS` left out. The share of the cores other jobs left free during
each run (`FreeShare`) is measured and shown, not divided out: dividing by it over-corrected in a
measured case (fsdp4 at 36% and 65% free: 5.1k and 6.6k tokens/s raw, 14.1k and 10.2k divided),
because our ranks also wait in collectives, so they do not use every core they are left. With ROUNDS > 1 every layout runs once per round,
round after round: on a shared machine the load drifts, and interleaving spreads a busy minute
over all layouts instead of charging it to one. Rank 0 prints a progress line per run and writes
OUT.json: the machine figures the fit starts from, and per layout its medians.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from core.launch_config import LaunchConfig
from core.run_config import load_config
from launch.context import init_distributed, shutdown
from trainer.train import train

# The first steps build caches, warm the allocator and (under FSDP) the collectives' buffers.
WARMUP_STEPS = 2


def _rate(fn, work: float, repeat: int = 5) -> float:
    """work / (median seconds of fn())."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return work / statistics.median(times)


def _machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat), and its core count."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")      # all but idle and iowait


class FreeShare:
    """The share of the machine's cores this cluster could have during a stretch of time: 1 minus
    what OTHER processes used (machine busy time from /proc/stat less our ranks' own CPU time).
    On a shared machine other jobs take cores from every rank alike: the figure says how busy the
    machine was while a run was timed. One machine only (the CPU cluster calibrate runs on)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def __enter__(self):
        self.t, self.cpu, self.busy = time.perf_counter(), time.process_time(), _machine_busy_s()
        return self

    def __exit__(self, *exc):
        ours = torch.tensor([time.process_time() - self.cpu], dtype=torch.float64)
        dist.all_reduce(ours)
        wall, cores = time.perf_counter() - self.t, len(os.sched_getaffinity(0))
        others = max(0.0, _machine_busy_s() - self.busy - float(ours))
        self.share = min(1.0, max(0.05, 1 - others / (cores * wall)))


def matmul_rate(ctx) -> float:
    """FLOP/s of a 512^3 fp32 matmul on each rank while all run it (the ranks share the cores as in
    training), averaged over ranks."""
    n = 512
    a, b = torch.randn(n, n), torch.randn(n, n)
    dist.barrier()
    rate = torch.tensor([_rate(lambda: torch.mm(a, b), 2 * n ** 3)], dtype=torch.float64)
    dist.all_reduce(rate, op=dist.ReduceOp.AVG)
    return float(rate)


def machine_figures(ctx) -> dict:
    """What one rank reaches while every rank runs the same thing (the cluster's own sharing of
    cores and memory): large fp32 matmuls, a memory-bound copy, and gloo collectives (bandwidth
    of a 4 MB all-reduce, latency of an 8-byte one). The fit's efficiencies are fractions of these."""
    flops = matmul_rate(ctx)
    src = torch.randn(8 * 1024 ** 2)        # 32 MB: beyond the caches
    dst = torch.empty_like(src)
    copy = _rate(lambda: dst.copy_(src), 2 * src.numel() * 4)
    w = ctx.world_size
    big, small = torch.zeros(1024 ** 2), torch.zeros(2)
    dist.barrier()
    # ring all-reduce: 2(w-1)/w of the buffer per rank (the planner's convention)
    bus = _rate(lambda: dist.all_reduce(big), 2 * (w - 1) / w * big.numel() * 4) if w > 1 else 1e12
    dist.barrier()
    lat = 1 / _rate(lambda: dist.all_reduce(small), 1.0, repeat=21) if w > 1 else 0.0
    figures = torch.tensor([copy, bus, lat], dtype=torch.float64)
    dist.all_reduce(figures, op=dist.ReduceOp.AVG)
    copy, bus, lat = figures.tolist()
    # an all-reduce's latency is 2(w-1) ring steps in the planner's model: one step's share
    return {"matmul_flops": flops, "copy_bytes_per_s": copy, "allreduce_bus_bytes_per_s": bus,
            "step_latency_s": lat / (2 * (w - 1)) if w > 1 else 0.0, "cores": len(os.sched_getaffinity(0))}


def run_one(args: list[str], run_dir: str, ctx) -> list[float]:
    """Per-step tokens/s of one short run (rank 0's list; the others return [])."""
    config = args[args.index("--config") + 1] if "--config" in args else None
    rest = [a for i, a in enumerate(args) if a != "--config" and (i == 0 or args[i - 1] != "--config")]
    quiet = ["--run.dir", run_dir, "--metrics.log_every", "1", "--metrics.progress", "false",
             "--metrics.tensorboard", "false", "--checkpoint.every", "0", "--checkpoint.final", "false",
             "--train.eval_every", "0", "--train.eval_batches", "1", "--train.threads", "1"]
    train(load_config(config, rest + quiet), ctx=ctx)
    if not ctx.is_main:
        return []
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and "loss" in r]


def main() -> None:
    out, rounds, specs = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    ctx = init_distributed(LaunchConfig(), "cpu")
    root = [tempfile.mkdtemp(prefix="mf-calibrate-") if ctx.is_main else None]
    dist.broadcast_object_list(root, src=0)
    # an untimed run first: the first training in a process pays one-off costs (imports, the data
    # loader's index, gloo's first connections) that would be charged to whichever layout came first
    name, _, args = specs[0].partition("=")
    run_one(args.split() + ["--train.steps", str(WARMUP_STEPS + 1)], f"{root[0]}/warm-up", ctx)
    with FreeShare(ctx) as free:
        machine = machine_figures(ctx)
    machine["free_share"] = free.share
    result = {"world_size": ctx.world_size, "machine": machine, "layouts": {}}
    steps: dict[str, list[float]] = {}
    share: dict[str, list[float]] = {}
    total = rounds * len(specs)
    for r in range(rounds):
        for i, spec in enumerate(specs):
            name, _, args = spec.partition("=")
            try:
                with FreeShare(ctx) as free:
                    tps = run_one(args.split(), f"{root[0]}/{name}-{r}", ctx)[WARMUP_STEPS:]
                share.setdefault(name, []).append(free.share)
            except Exception:     # report and go on: one broken layout should not hide the others
                result["layouts"][name] = {"error": traceback.format_exc(limit=3)}
                continue
            steps.setdefault(name, []).extend(tps)
            if ctx.is_main:
                print(f"calibrate [{r * len(specs) + i + 1}/{total}] {name}: "
                      f"{statistics.median(tps) if tps else float('nan'):,.0f} tokens/s "
                      f"({share[name][-1]:.0%} of the cores free of other jobs)", flush=True)
    if ctx.is_main:
        for name, tps in steps.items():
            if "error" not in result["layouts"].get(name, {}):
                result["layouts"][name] = {"tokens_per_s": statistics.median(tps), "steps": tps, "free_share": share[name]}
        Path(out).write_text(json.dumps(result, indent=1))
    shutdown(ctx)


if __name__ == "__main__":
    main()
