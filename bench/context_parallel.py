"""Context parallel on CPU: peak memory per rank and tokens/s against sequence length, CP 1/2/4.

    PYTHONPATH=. python -m bench.context_parallel [--seq 1024,2048,4096,8192,16384] [--cp 1,2,4]

Each (cp, seq_len) runs in fresh processes (gloo, one thread each) so a process's peak resident
memory is that configuration's: a small model (dim 64, 4 heads, 2 layers, vocab 320) trains one
step on one row of seq_len tokens (after a warm-up step of a few tokens), rank r holding the
zigzag chunks r and 2cp-1-r (parallel/context.py); CP 1 is the plain model (SDPA's fused causal kernel). "peak MiB" is the
growth of the resident set over a training step (peak RSS during it minus the RSS before: imports,
weights and a first small warm-up step left out), the largest over the ranks; tokens/s is seq_len /
that step's time (the whole job's throughput). Weights are replicated and their gradients not
reduced: what is measured is the sequence's share, activations and attention. On a shared, loaded machine the
times are only indicative. glibc's malloc raises its mmap threshold after freeing a large block
and then keeps freed attention tiles in its heap, so the resident set would count memory the
program no longer holds: the workers run with a fixed threshold (MALLOC_MMAP_THRESHOLD_).
"""
from __future__ import annotations

import argparse
import os
import resource
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from core.model_config import ModelConfig
from parallel.context import apply_context_parallel, zigzag_index
from trainer.model import Transformer
from trainer.model_plan import parallel_plan


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def step(model, x, y, idx, cp: int) -> None:
    logits = model(x, positions=idx) if cp > 1 else model(x)
    F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").backward()
    if cp > 1:
        dist.barrier()


def worker(rank: int, cp: int, seq: int, port: int, out) -> None:
    torch.set_num_threads(1)
    if cp > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp)
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=320, ffn_hidden=128, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if cp > 1:
        plan = parallel_plan(cfg)
        apply_context_parallel(model, plan.blocks, plan.attention, plan.attention_core, dist.group.WORLD, "ring")
    tokens = torch.randint(0, 320, (1, seq + 1), generator=torch.Generator().manual_seed(1))
    idx = zigzag_index(seq, cp, rank)
    x, y = tokens[:, :-1].index_select(1, idx), tokens[:, 1:].index_select(1, idx)
    # one step of 8 x 2cp tokens first: one-time costs are not the sequence's (the first
    # non-reentrant checkpoint imports torch._dynamo, ~75 MiB; gloo's first messages)
    small = zigzag_index(16 * cp, cp, rank)
    step(model, tokens[:, :16 * cp].index_select(1, small), tokens[:, 1:16 * cp + 1].index_select(1, small), small, cp)
    base, t = rss_mib(), time.perf_counter()
    step(model, x, y, idx, cp)
    out.put((rank, peak_rss_mib() - base, time.perf_counter() - t))
    if cp > 1:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(cp: int, seq: int) -> tuple[float, float]:
    """(peak MiB of the largest rank, tokens/s) of one configuration."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    mp.start_processes(worker, args=(cp, seq, free_port(), out), nprocs=cp, start_method="spawn")
    rows = [out.get() for _ in range(cp)]
    return max(r[1] for r in rows), seq / max(r[2] for r in rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", default="1024,2048,4096,8192,16384")
    ap.add_argument("--cp", default="1,2,4")
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))   # read by each spawned worker's libc
    cps = [int(c) for c in args.cp.split(",")]
    seqs = [int(s) for s in args.seq.split(",")]
    results = {}
    for seq in seqs:
        for cp in cps:
            results[seq, cp] = measure(cp, seq)
            print(f"seq {seq} cp {cp}: {results[seq, cp][0]:.0f} MiB, {results[seq, cp][1]:.0f} tok/s", flush=True)
    head = "| seq_len | " + " | ".join(f"CP {c} peak MiB/rank | CP {c} tok/s" for c in cps) + " |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(cps)))
    for seq in seqs:
        cells = " | ".join(f"{results[seq, c][0]:.0f} | {results[seq, c][1]:.0f}" for c in cps)
        print(f"| {seq} | {cells} |")


if __name__ == "__main__":
    main()
