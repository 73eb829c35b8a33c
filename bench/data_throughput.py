"""Loader throughput (tokens/s, 0 and 2 workers) as ratios to baselines measured in the same run.

    python bench/data_throughput.py [--seconds 4]

Baselines:
- the tiny model's consumption: training steps (forward, backward, AdamW) of a plain-PyTorch model
  shaped like configs/tiny (dim 128, 4 layers, 4 heads, SwiGLU, RoPE, RMSNorm, vocab 320,
  seq_len 128, batch 16); the loader should be >= 20x faster so it never stalls training;
  (measured at 1 thread and at torch's default thread count, the faster counts);
- a raw read of the same tar files (Python's tarfile, every member read, no decoding): the
  ceiling for reading these shards in one process.
Data: the built-in corpus (prepared into the cache on first use), byte tokenizer.
"""

from __future__ import annotations

import argparse
import os
import sys
import tarfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataConfig, build_loader  # noqa: E402

SEQ, BATCH, VOCAB, DIM, LAYERS, HEADS = 128, 16, 320, 128, 4, 4


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(DIM), nn.RMSNorm(DIM)
        self.qkv, self.o = nn.Linear(DIM, 3 * DIM, bias=False), nn.Linear(DIM, DIM, bias=False)
        hidden = 4 * DIM * 2 // 3
        self.w1, self.w3 = nn.Linear(DIM, hidden, bias=False), nn.Linear(DIM, hidden, bias=False)
        self.w2 = nn.Linear(hidden, DIM, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.n1(x)).view(b, t, 3, HEADS, DIM // HEADS).unbind(2)
        q, k = (rope(z, cos, sin).transpose(1, 2) for z in (q, k))
        a = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, DIM))
        h = self.n2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


def rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm, self.head = nn.RMSNorm(DIM), nn.Linear(DIM, VOCAB, bias=False)
        half = DIM // HEADS // 2
        freqs = 1.0 / (10000 ** (torch.arange(half) / half))
        angles = torch.outer(torch.arange(SEQ).float(), freqs)[None, :, None, :]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, idx):
        x = self.emb(idx)
        for blk in self.blocks:
            x = blk(x, self.cos[:, : idx.shape[1]], self.sin[:, : idx.shape[1]])
        return self.head(self.norm(x))


def model_tokens_per_s(seconds: float) -> float:
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 257, (BATCH, SEQ))

    def step():
        loss = F.cross_entropy(model(x).flatten(0, 1), x.roll(-1, 1).flatten(), ignore_index=-100)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
    return n * BATCH * SEQ / (time.perf_counter() - t0)


def loader_tokens_per_s(cfg: DataConfig, seconds: float) -> float:
    loader = build_loader(cfg, split="train", seq_len=SEQ, batch_size=BATCH, dp_rank=0, dp_size=1, seed=0)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(it)
        n += 1
    return n * BATCH * SEQ / (time.perf_counter() - t0)


def raw_read_tokens_per_s(urls: list[str], tokens: int) -> float:
    t0 = time.perf_counter()
    for url in urls:
        with tarfile.open(url, "r|") as tf:
            for member in tf:
                if member.isreg():
                    tf.extractfile(member).read()
    return tokens / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="timing window per measurement")
    args = ap.parse_args()
    cfg = DataConfig()
    probe = build_loader(cfg, split="train", seq_len=SEQ, batch_size=BATCH, dp_rank=0, dp_size=1, seed=0)
    urls = [s["url"] for s in probe.sources[0].shards]
    tokens = probe.stats["tokens"] + probe.stats["docs"]
    raw = raw_read_tokens_per_s(urls, tokens)
    # The fastest consumer is the strictest baseline: on a busy machine one thread can beat all cores.
    model = 0.0
    for threads in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(threads)
        model = max(model, model_tokens_per_s(args.seconds / 2))
    print(f"data: builtin:stdlib, {len(urls)} shards, {tokens / 1e6:.1f} M tokens (byte tokenizer); "
          f"batch {BATCH} x seq {SEQ}")
    print(f"tiny model consumption (plain-PyTorch stand-in, fwd+bwd+AdamW, best of 1 thread and "
          f"{torch.get_num_threads()}): {model:12,.0f} tokens/s")
    print(f"raw tarfile read of the same shards:                        {raw:12,.0f} tokens/s")
    for workers in (0, 2):
        cfg.num_workers = workers
        rate = loader_tokens_per_s(cfg, args.seconds)
        ok = "ok" if rate / model >= 20 else "BELOW TARGET"
        print(f"loader, {workers} workers: {rate:12,.0f} tokens/s = {rate / model:6.1f}x tiny model ({ok}, target "
              f">= 20x), {rate / raw:5.2f}x raw tar read")
    return 0


if __name__ == "__main__":
    sys.exit(main())
