"""Our training step against a bare hand-written PyTorch loop: same model, same data, one process.

The two alternate in short blocks (so machine noise hits both alike) and the script prints the
tokens/s of each and their ratio (ours / bare; 1.0 = no overhead). Both do the same work per step:
forward, cross-entropy, backward, global-norm clipping, AdamW, LR schedule.

    python bench/step_overhead.py [--config configs/tiny.toml] [--blocks 6] [--steps-per-block 10]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.run_config import load_config  # noqa: E402
from parallel.local_engine import LocalEngine  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402


def bare_step(model, opt, sched, x, y, clip):
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip, foreach=True)
    opt.step()
    sched.step()
    return loss.item()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny.toml")
    p.add_argument("--blocks", type=int, default=12)
    p.add_argument("--steps-per-block", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    torch.manual_seed(0)
    ours_model = Transformer(cfg.model)
    bare_model = copy.deepcopy(ours_model)
    dev = torch.device("cpu")
    ours_opt, bare_opt = build_optimizer(ours_model, cfg.optim, dev), build_optimizer(bare_model, cfg.optim, dev)
    steps = args.blocks * args.steps_per_block + args.warmup + 1
    ours_sched, bare_sched = (build_scheduler(o, cfg.optim, steps) for o in (ours_opt, bare_opt))
    engine = LocalEngine(ours_model, ours_opt, ours_sched, dev, cfg.precision.dtype, cfg.optim.grad_clip)
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model.vocab_size
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, V, (8, B, T + 1), generator=g)
    batches = [(d[:, :-1].contiguous(), d[:, 1:].contiguous()) for d in data]

    for i in range(args.warmup):
        x, y = batches[i % len(batches)]
        engine.train_step([(x, y)])
        bare_step(bare_model, bare_opt, bare_sched, x, y, cfg.optim.grad_clip)

    times = {"ours": [], "bare": []}
    for block in range(args.blocks):
        order = ("ours", "bare") if block % 2 == 0 else ("bare", "ours")
        for who in order:
            t0 = time.perf_counter()
            for s in range(args.steps_per_block):
                x, y = batches[s % len(batches)]
                if who == "ours":
                    engine.train_step([(x, y)])
                else:
                    bare_step(bare_model, bare_opt, bare_sched, x, y, cfg.optim.grad_clip)
            times[who].append(time.perf_counter() - t0)

    tokens = args.steps_per_block * B * T
    tps = {k: tokens / statistics.median(v) for k, v in times.items()}
    # Each block of ours ran right beside a block of bare: the median of those pairs' ratios
    # cancels slow drifts of the machine that the medians alone do not.
    pair_ratio = statistics.median(b / o for o, b in zip(times["ours"], times["bare"]))
    # Same seed, same data, same work: the two models must still agree (a fair comparison).
    same = all(torch.allclose(a, b, atol=1e-4) for a, b in zip(ours_model.parameters(), bare_model.parameters()))
    print(f"model {ours_model.num_params() / 1e6:.2f}M params, batch {B}x{T}, {args.blocks} blocks x {args.steps_per_block} steps, "
          f"threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop : {tps['bare']:10.0f} tokens/s")
    print(f"meshformer step   : {tps['ours']:10.0f} tokens/s")
    print(f"ratio ours/bare   : {pair_ratio:.3f}   (median over {args.blocks} adjacent block pairs; target >= 0.97; "
          f"weights still equal: {same})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
