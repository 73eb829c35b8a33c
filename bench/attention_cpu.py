"""bf16 causal attention on the CPU: torch's flash kernel (SDPA) against the explicit path
(trainer.attention.explicit_attention: two batched GEMMs around a softmax), forward + backward,
at a fixed token count per call, for a range of sequence lengths: where the explicit path stops
paying is trainer.attention.CPU_BF16_EXPLICIT_MAX_KEYS.

    python bench/attention_cpu.py                      # 64-dim heads, 4 heads, 2048 tokens per call
    python bench/attention_cpu.py --seqs 256,512,1024 --tokens 4096
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.attention import explicit_attention  # noqa: E402


def seconds(fn, q, k, v, grad, reps: int) -> float:
    """Fastest of `reps` forward + backward passes, after one untimed."""
    best = float("inf")
    for i in range(reps + 1):
        t0 = time.perf_counter()
        fn(q, k, v).backward(grad)
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default="128,256,512,1024,2048", help="sequence lengths (default: 128,...,2048)")
    p.add_argument("--tokens", type=int, default=2048, help="batch x sequence per call (default: 2048)")
    p.add_argument("--heads", type=int, default=4, help="default: 4")
    p.add_argument("--head-dim", type=int, default=64, help="default: 64")
    p.add_argument("--reps", type=int, default=5, help="default: 5")
    args = p.parse_args(argv)
    print(f"bf16 causal attention, {args.heads} heads x {args.head_dim}, {args.tokens} tokens per call, "
          f"threads {torch.get_num_threads()}; forward + backward, best of {args.reps}")
    print("| keys | SDPA (flash) ms | explicit ms | explicit speed-up |\n|---:|---:|---:|---:|")
    for t in (int(s) for s in args.seqs.split(",")):
        b = max(1, args.tokens // t)
        q, k, v = (torch.randn(b, args.heads, t, args.head_dim, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        grad = torch.randn(b, args.heads, t, args.head_dim, dtype=torch.bfloat16)
        flash = seconds(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), q, k, v, grad, args.reps)
        mine = seconds(lambda q, k, v: explicit_attention(q, k, v, None, None), q, k, v, grad, args.reps)
        print(f"| {t} | {flash * 1e3:.2f} | {mine * 1e3:.2f} | {flash / mine:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
