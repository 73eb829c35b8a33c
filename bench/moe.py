"""Tokens/s of one MoE layer (forward + backward): grouped GEMM vs loops over experts, one run.

    python bench/moe.py                 # dim 256, 8 experts of width 512, top-2, 4096 tokens
    python bench/moe.py --quick         # a smaller layer (a smoke run)

Three ways to run the same experts on the same routing:
- grouped: trainer/moe.py's path, tokens sorted by expert, one `torch._grouped_mm` per weight;
- sorted loop: the same sorted tokens, one matmul per expert (trainer/moe.py's fallback);
- mask loop: the textbook loop (Mixtral's reference code): per expert, find its tokens, gather,
  run the MLP, scatter-add back; a host read per expert.
and, as a fourth way, grouped with the Sinkhorn choice (`moe_sinkhorn_iters` 10 and the default 16
hard price steps; other routing, so not compared): what balancing each micro-batch costs.
Outputs are checked equal (fp32) before timing. The ways take turns; the median of the timed repeats is reported.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from core.model_config import ModelConfig
from trainer.model import Transformer
from trainer.moe import moe_layers


def mask_loop(m, x: torch.Tensor) -> torch.Tensor:
    chosen, gates, _, _ = m.route(x)
    e, out = m.experts, torch.zeros_like(x)
    for i in range(m.n_experts):
        token, slot = torch.where(chosen == i)
        if token.numel() == 0:
            continue
        xi = x[token]
        h = F.silu(xi @ e.w1[i]) * (xi @ e.w3[i])
        out = out.index_add(0, token, (h @ e.w2[i]) * gates[token, slot, None])
    return out


def timed(ways: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median seconds per fwd+bwd of each way, the ways taking turns (a shared machine's load
    then falls on all of them alike); the first round warms up (allocations, kernels)."""
    times = {name: [] for name in ways}
    for _ in range(repeats + 1):
        for name, fn in ways.items():
            xi = x.clone().requires_grad_()
            t = time.perf_counter()
            fn(xi).square().mean().backward()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a small layer (default: false)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats (default: 5)")
    args = ap.parse_args()
    dim, hidden, experts, tokens = (64, 128, 8, 512) if args.quick else (256, 512, 8, 4096)
    cfg = ModelConfig(vocab_size=64, dim=dim, n_layers=1, n_heads=4, moe_experts=experts, moe_top_k=2,
                      moe_hidden=hidden)
    torch.manual_seed(0)
    m = moe_layers(Transformer(cfg))[0]
    x = torch.randn(tokens, dim)

    def run(grouped, sinkhorn=False):
        def fn(xi):
            m.experts.grouped = grouped
            m.sinkhorn_iters, m.hard_steps = (10, 16) if sinkhorn else (0, 0)
            return m(xi)
        return fn

    with torch.no_grad():
        ref = mask_loop(m, x)
        for grouped in (True, False):
            torch.testing.assert_close(run(grouped)(x), ref)
    ways = {"grouped GEMM": run(True), "sorted loop": run(False), "mask loop": lambda xi: mask_loop(m, xi),
            "grouped + Sinkhorn choice": run(True, sinkhorn=True)}
    tps = {name: tokens / sec for name, sec in timed(ways, x, args.repeats).items()}
    print(f"MoE layer fwd+bwd on {torch.get_num_threads()} CPU threads: dim {dim}, {experts} experts of width "
          f"{hidden}, top-2, {tokens} tokens")
    for name, v in tps.items():
        print(f"  {name:25s} {v:10.0f} tokens/s")
    print(f"grouped GEMM / mask loop: {tps['grouped GEMM'] / tps['mask loop']:.2f}x; "
          f"grouped GEMM / sorted loop: {tps['grouped GEMM'] / tps['sorted loop']:.2f}x; "
          f"Sinkhorn choice / plain top-k (grouped): {tps['grouped + Sinkhorn choice'] / tps['grouped GEMM']:.2f}x")


if __name__ == "__main__":
    main()
