"""FSDP2 against DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload: the same model, data and
global batch through the real trainer, tokens/s and step time of each, its ratio to FSDP, and
each rank's peak memory, measured in the same launch. The layouts alternate over `--rounds`
rounds (machine noise hits all alike) and each speed figure is the median over rounds of a run's
median logged value (the first steps, start-up and warm-up, left out).

Memory: the trainer's logged `peak_mem_gib` is, on a CPU, the process's lifetime maximum RSS
(getrusage), which cannot tell layouts run one after another in one process apart. So each run
here resets the kernel's high-water mark first (`5` to /proc/self/clear_refs, Linux >= 4.0) and
reads VmHWM after it: the run's own peak RSS per rank (the maximum over rounds), which includes
what the process held before the run (Python, torch, DeepSpeed's import, allocator caches), shown
as the run's start RSS. On a GPU the device's peak would be torch.cuda.max_memory_allocated after
reset_peak_memory_stats; this script runs on the CPU (gloo) only, so device memory is host memory.

    torchrun --nproc_per_node 2 bench/zero_vs_fsdp.py [--steps 12] [--rounds 2] [--dim 256] [--seq 256] [--layouts zero3]

On a CPU "offload" moves nothing (host to host): its ratio measures DeepSpeed's bookkeeping only;
on GPUs it adds the PCIe traffic that buys the memory. Never run more ranks than cores.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.launch_config import LaunchConfig  # noqa: E402
from core.run_config import load_config  # noqa: E402
from launch.context import init_distributed, shutdown  # noqa: E402
from trainer.train import train  # noqa: E402

DS = ["--parallel.engine", "deepspeed", "--parallel.zero_stage"]
LAYOUTS = {
    "fsdp2": ["--parallel.dp_shard", "-1"],
    "zero2": DS + ["2"],
    "zero3": DS + ["3"],
    "zero3_offload": DS + ["3", "--parallel.offload_optimizer", "cpu", "--parallel.offload_param", "cpu"],
}
SKIP = 3    # logged steps left out of each run's median: start-up, allocator and DeepSpeed warm-up


def status_gib(field: str) -> float:
    """A /proc/self/status size (kB) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise RuntimeError(f"/proc/self/status has no {field}")


def run(root: str, name: str, rnd: int, args, ctx) -> tuple[tuple[float, float] | None, list]:
    """((median tokens/s, median step seconds) on rank 0, else None; [(peak, start) GiB per rank])."""
    run_dir = f"{root}/{name}-{rnd}"
    gc.collect()            # the previous run's garbage out of this run's start and peak
    start = status_gib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")       # VmHWM := VmRSS
    cfg = load_config("configs/tiny.toml", [
        "--model.dim", str(args.dim), "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "4",
        "--model.vocab_size", "320", "--train.seq_len", str(args.seq), "--train.batch_size", "4",
        "--train.steps", str(args.steps), "--train.eval_batches", "1", "--metrics.progress", "false",
        "--metrics.tensorboard", "false", "--metrics.log_every", "1", "--checkpoint.every", "0",
        "--checkpoint.final", "false", "--run.dir", run_dir, *LAYOUTS[name]])
    train(cfg, ctx=ctx)
    mem = [None] * ctx.world_size
    dist.all_gather_object(mem, (status_gib("VmHWM"), start))
    if not ctx.is_main:
        return None, mem
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "tokens_per_s" in r]
    # step time: between consecutive logged steps (log_every 1), so it includes the logging
    step_s = [b["time"] - a["time"] for a, b in zip(steps, steps[1:]) if a["step"] >= SKIP]
    return (statistics.median(r["tokens_per_s"] for r in steps if r["step"] > SKIP), statistics.median(step_s)), mem


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layouts", default=",".join(LAYOUTS),
                   help="comma-separated subset; one layout per launch gives peaks free of earlier runs' residue")
    args = p.parse_args()
    names = args.layouts.split(",")
    if any(n not in LAYOUTS for n in names):
        p.error(f"--layouts: a comma-separated subset of {', '.join(LAYOUTS)}")
    ctx = init_distributed(LaunchConfig(), "cpu")
    holder = [tempfile.mkdtemp(prefix="zero-bench-") if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    got: dict[str, list] = {name: [] for name in names}
    mems: dict[str, list] = {name: [] for name in names}
    for rnd in range(args.rounds):
        for name in names:
            speed, mem = run(holder[0], name, rnd, args, ctx)
            mems[name].append(mem)
            if speed is not None:
                got[name].append(speed)
    if ctx.is_main:
        base = statistics.median(t for t, _ in got["fsdp2"]) if "fsdp2" in got else float("nan")
        print(f"\nworld {ctx.world_size}, dim {args.dim}, 4 layers, seq {args.seq}, micro-batch 4 per rank, "
              f"{args.steps} steps x {args.rounds} rounds; memory: each rank's peak RSS in the run "
              f"(max over rounds) / its RSS at the run's start, GiB")
        print(f"{'layout':<15} {'tokens/s':>10} {'vs fsdp2':>9} {'step s':>8}  " +
              "  ".join(f"{'rank ' + str(r) + ' peak/start':>18}" for r in range(ctx.world_size)))
        for name, values in got.items():
            tps, step_s = statistics.median(t for t, _ in values), statistics.median(s for _, s in values)
            per_rank = [(max(m[r][0] for m in mems[name]), min(m[r][1] for m in mems[name]))
                        for r in range(ctx.world_size)]
            print(f"{name:<15} {tps:>10,.0f} {tps / base:>8.2f}x {step_s:>8.3f}  " +
                  "  ".join(f"{peak:>10.2f} / {start:>5.2f}" for peak, start in per_rank))
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
