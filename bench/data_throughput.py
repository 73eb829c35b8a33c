"""Loader throughput (tokens/s, 0 and 2 workers) as ratios to baselines measured in the same run.

    python bench/data_throughput.py [--seconds 4]

Baselines:
- the tiny model's consumption: training steps (forward, backward, clipping, AdamW) of
  configs/tiny.toml's model through the trainer's engine (seq_len 128, batch 16); the loader
  should be >= 20x faster so it never stalls training;
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import DataConfig, build_loader  # noqa: E402
from core.run_config import load_config  # noqa: E402
from parallel.local_engine import LocalEngine  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402

SEQ, BATCH = 128, 16


def model_tokens_per_s(seconds: float) -> float:
    """Training steps of the real tiny model (configs/tiny.toml) through the trainer's engine."""
    cfg = load_config("configs/tiny.toml")
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    dev = torch.device("cpu")
    opt = build_optimizer(model, cfg.optim, dev)
    engine = LocalEngine(model, opt, build_scheduler(opt, cfg.optim, 10**6), dev, "fp32", cfg.optim.grad_clip)
    x = torch.randint(0, 257, (BATCH, SEQ))
    batch = [(x, x.roll(-1, 1))]
    engine.train_step(batch)  # warm up
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        engine.train_step(batch)
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
    print(f"tiny model consumption (configs/tiny.toml, trainer engine, best of 1 thread and "
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
