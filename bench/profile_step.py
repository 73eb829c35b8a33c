"""Where one CPU training step's time goes, grouped (torch.profiler, self time of every op).

The step is the trainer's (parallel.local_engine.LocalEngine), at bench/vs_hf.py's shape by default.
Every op's self time is put in one group: matmuls, attention (SDPA, or the explicit path's softmax), dtype casts, the optimizer
(anything under AdamW's step), gradient clipping, compiled regions (inductor's fused kernels, whose
inner ops the profiler does not see), the loss, and the rest (elementwise work of norms, RoPE,
SwiGLU, residual adds, their backward, gradient zeroing and accumulation).

    python bench/profile_step.py --dtype bf16                 # 4 layers, d 256, seq 256, batch 8
    python bench/profile_step.py --dtype fp32 --compile --top 15
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.vs_hf import our_engine, shape_config  # noqa: E402

GROUPS = (  # (group, substrings of an op's name), first match wins
    ("matmul", ("aten::mm", "aten::bmm", "aten::baddbmm", "aten::addmm", "aten::matmul", "mkldnn")),
    # SDPA's kernels, or the softmax of trainer.attention.explicit_attention (its GEMMs count as matmul)
    ("attention (SDPA / softmax)", ("scaled_dot_product", "aten::_softmax")),
    ("casts (dtype copies)", ("aten::copy_", "aten::_to_copy", "aten::to")),
    ("loss", ("log_softmax", "nll_loss", "logsumexp", "ChunkedTokenLossSum", "gather", "scatter")),
    ("compiled regions", ("Compiled", "cpp_fused", "Torch-Compiled", "inductor")),
)


def group_of(event) -> str:
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer (AdamW)"
        parent = parent.cpu_parent
    if "linalg_vector_norm" in event.name or "_foreach_norm" in event.name:
        return "grad clip (norm)"
    for group, names in GROUPS:
        if any(n in event.name for n in names):
            return group
    return "elementwise and other"


def profile_steps(engine, batch, steps: int) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.train_step([batch]).loss.item()
        wall = (time.perf_counter() - t0) / steps
    groups, ops = defaultdict(float), defaultdict(float)
    for e in prof.events():
        groups[group_of(e)] += e.self_cpu_time_total / steps
        ops[e.name] += e.self_cpu_time_total / steps
    return dict(groups), sorted(ops.items(), key=lambda kv: -kv[1]), wall


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--compile", action="store_true", help="compile each block, as --parallel.compile true does")
    p.add_argument("--steps", type=int, default=3, help="profiled steps, after 3 untimed ones (default: 3)")
    p.add_argument("--top", type=int, default=10, help="also list the N ops with the most self time (default: 10)")
    for name, default in (("layers", 4), ("dim", 256), ("heads", 4), ("ffn", 688), ("seq", 256), ("batch", 8)):
        p.add_argument(f"--{name}", type=int, default=default, help=f"default: {default}")
    args = p.parse_args(argv)
    cfg = shape_config(args)
    engine = our_engine(cfg, args.dtype, 100, args.compile)
    data = torch.randint(0, cfg.model.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    batch = (data[:, :-1].contiguous(), data[:, 1:].contiguous())
    for _ in range(3):
        engine.train_step([batch]).loss.item()
    groups, ops, wall = profile_steps(engine, batch, args.steps)
    total = sum(groups.values())
    print(f"{args.dtype}{' compiled' if args.compile else ''}, {args.layers} layers, d {args.dim}, seq {args.seq}, "
          f"batch {args.batch}: {wall * 1e3:.0f} ms per step under the profiler, {total / 1e3:.0f} ms of op self "
          f"time, threads {torch.get_num_threads()}")
    print("| where | ms/step | share |\n|---|---:|---:|")
    for g, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"| {g} | {us / 1e3:.1f} | {us / total:.0%} |")
    print(f"\ntop {args.top} ops by self time (ms/step):")
    for name, us in ops[:args.top]:
        print(f"  {us / 1e3:8.1f}  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
