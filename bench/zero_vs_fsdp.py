"""FSDP2 against DeepSpeed ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload: the same model, data and
global batch through the real trainer, tokens/s of each and its ratio to FSDP measured in the
same launch. The layouts alternate over `--rounds` rounds (machine noise hits all alike) and each
figure is the median over rounds of a run's median logged tokens/s (the first steps, start-up
and warm-up, left out).

    torchrun --nproc_per_node 2 bench/zero_vs_fsdp.py [--steps 12] [--rounds 2] [--dim 256] [--seq 256]

On a CPU "offload" moves nothing (host to host): its ratio measures DeepSpeed's bookkeeping only;
on GPUs it adds the PCIe traffic that buys the memory. Never run more ranks than cores.
"""
from __future__ import annotations

import argparse
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


def run(root: str, name: str, rnd: int, args, ctx) -> float | None:
    run_dir = f"{root}/{name}-{rnd}"
    cfg = load_config("configs/tiny.toml", [
        "--model.dim", str(args.dim), "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "4",
        "--model.vocab_size", "320", "--train.seq_len", str(args.seq), "--train.batch_size", "4",
        "--train.steps", str(args.steps), "--train.eval_batches", "1", "--metrics.progress", "false",
        "--metrics.tensorboard", "false", "--metrics.log_every", "1", "--checkpoint.every", "0",
        "--checkpoint.final", "false", "--run.dir", run_dir, *LAYOUTS[name]])
    train(cfg, ctx=ctx)
    if not ctx.is_main:
        return None
    rows = [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > SKIP)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    ctx = init_distributed(LaunchConfig(), "cpu")
    holder = [tempfile.mkdtemp(prefix="zero-bench-") if ctx.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    got: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for rnd in range(args.rounds):
        for name in LAYOUTS:
            tps = run(holder[0], name, rnd, args, ctx)
            if tps is not None:
                got[name].append(tps)
    if ctx.is_main:
        base = statistics.median(got["fsdp2"])
        print(f"\nworld {ctx.world_size}, dim {args.dim}, 4 layers, seq {args.seq}, micro-batch 4 per rank, "
              f"{args.steps} steps x {args.rounds} rounds")
        print(f"{'layout':<15} {'tokens/s':>10} {'vs fsdp2':>9}")
        for name, values in got.items():
            tps = statistics.median(values)
            print(f"{name:<15} {tps:>10,.0f} {tps / base:>8.2f}x")
    shutdown(ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
