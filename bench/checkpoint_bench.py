"""Checkpoint benchmark: synchronous DCP save throughput against torch.save of the same state,
and the training time an asynchronous save costs as a fraction of a synchronous one.

    python bench/checkpoint_bench.py [--dim 512 --layers 6 --vocab 16384 --steps 12 --every 4]

One process (never more ranks than cores). Prints one line per figure and a JSON summary.
Targets: save ratio near 1 (DCP's sharded writer no slower than torch.save), async cost < 10 %.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from launch.context import DistContext  # noqa: E402
from trainer.checkpoint import CheckpointManager  # noqa: E402
from trainer.config import load_config  # noqa: E402
from trainer.engine import cross_entropy  # noqa: E402
from trainer.model import Transformer  # noqa: E402
from trainer.optim import build_optimizer, build_scheduler  # noqa: E402
from trainer.train import TrainState  # noqa: E402


class Batches:
    def __init__(self, vocab, seq, batch):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, vocab, (batch, seq + 1), generator=g)
        self.pos = 0

    def next(self):
        self.pos += 1
        return self.x[:, :-1], self.x[:, 1:]

    def state_dict(self):
        return {"pos": self.pos}


def setup(args, run_dir: Path, async_save: bool):
    cfg = load_config(None, [
        "--model.dim", str(args.dim), "--model.n_layers", str(args.layers), "--model.n_heads", "8",
        "--model.vocab_size", str(args.vocab), "--run.dir", str(run_dir), "--checkpoint.keep", "1",
        "--checkpoint.async", str(async_save).lower(), "--train.steps", "1000"])
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Transformer(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim, device)
    sched = build_scheduler(opt, cfg.optim, 1000)
    loader, state = Batches(args.vocab, args.seq, args.batch), TrainState()
    ckpt = CheckpointManager(cfg, DistContext(device=device), run_dir, model=model, optimizer=opt, scheduler=sched,
                             loader=loader, state=state)
    return types.SimpleNamespace(device=device, cfg=cfg, model=model, opt=opt, sched=sched, loader=loader, state=state, ckpt=ckpt)


def sync(r):
    if r.device.type == "cuda":
        torch.cuda.synchronize()


def step(r):
    x, y = (t.to(r.device) for t in r.loader.next())
    r.opt.zero_grad(set_to_none=True)
    cross_entropy(r.model(x), y).backward()
    r.opt.step()
    r.sched.step()
    r.state.step += 1


def state_bytes(r) -> int:
    n = sum(t.numel() * t.element_size() for t in r.model.state_dict().values())
    for s in r.opt.state.values():
        n += sum(t.numel() * t.element_size() for t in s.values() if torch.is_tensor(t))
    return n


def bench_save(args, tmp: Path) -> dict:
    r = setup(args, tmp / "save", False)
    step(r)                                     # optimizer state exists
    size = state_bytes(r)
    dcp_t, ts_t, ts_sync_t = [], [], []
    for i in range(args.repeats):
        r.state.step += 1
        sync(r)
        t = time.perf_counter()
        r.ckpt.save()
        dcp_t.append(time.perf_counter() - t)
        f = tmp / f"torch-{i}.pt"
        t = time.perf_counter()
        torch.save({"model": r.model.state_dict(), "optim": r.opt.state_dict()}, f)
        ts_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        torch.save({"model": r.model.state_dict(), "optim": r.opt.state_dict()}, f)
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        ts_sync_t.append(time.perf_counter() - t)
        f.unlink()
    r.ckpt.finish()
    dcp_s, ts_s, tss_s = (statistics.median(x) for x in (dcp_t, ts_t, ts_sync_t))
    return {"state_mb": size / 2**20, "dcp_save_s": dcp_s, "torch_save_s": ts_s, "torch_save_fsync_s": tss_s,
            "dcp_gb_per_s": size / dcp_s / 1e9, "torch_save_gb_per_s": size / ts_s / 1e9,
            "throughput_ratio_vs_torch_save": ts_s / dcp_s, "throughput_ratio_vs_torch_save_fsync": tss_s / dcp_s}


def timed_training(args, run_dir: Path, mode: str):
    """Per-step times and the time the loop spent blocked in save()/poll()/finish()."""
    r = setup(args, run_dir, mode == "async")
    step(r)                                      # warm-up; optimizer state exists
    steps, blocked = [], 0.0
    n_steps = args.steps + args.every               # the last save's write overlaps `every` steps too
    for i in range(n_steps):
        t = time.perf_counter()
        step(r)
        sync(r)
        steps.append(time.perf_counter() - t)
        t = time.perf_counter()
        if mode != "none" and (i + 1) % args.every == 0 and i < args.steps:
            r.ckpt.save()
        elif r.ckpt.writer is not None:
            r.ckpt.writer.poll()
        blocked += time.perf_counter() - t
        if args.verbose and mode != "none":
            print(f"  {mode} step {i + 1}: step {steps[-1]:.3f} s, blocked {time.perf_counter() - t:.3f} s", flush=True)
    t = time.perf_counter()
    r.ckpt.finish()                              # the last async write is waited for: its cost counts
    return steps, blocked + time.perf_counter() - t


def bench_async(args, tmp: Path) -> dict:
    """Sync cost = time blocked in save(). Async cost = time blocked (staging copy, commit, final
    wait) + how much slower the steps ran while the write was in flight (against the median
    step time of the same loop without saves)."""
    base, sync_blocked, async_blocked, async_steps = [], [], [], []
    for rep in range(args.repeats):
        base += timed_training(args, tmp / f"none-{rep}", "none")[0]
        sync_blocked.append(timed_training(args, tmp / f"sync-{rep}", "sync")[1])
        st, b = timed_training(args, tmp / f"async-{rep}", "async")
        async_blocked.append(b)
        async_steps.append(st)
    step_s = statistics.median(base)
    slowdown = statistics.median(sum(st) - len(st) * step_s for st in async_steps)
    sync_cost = statistics.median(sync_blocked)
    async_cost = statistics.median(async_blocked) + max(0.0, slowdown)
    return {"step_s": step_s, "saves": args.steps // args.every, "sync_blocked_s": sync_cost,
            "async_blocked_s": statistics.median(async_blocked), "async_step_slowdown_s": slowdown,
            "async_cost_fraction_of_sync": async_cost / sync_cost}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--every", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        save = bench_save(args, Path(d))
        print(f"state {save['state_mb']:.0f} MiB: DCP save {save['dcp_save_s']:.3f} s ({save['dcp_gb_per_s']:.2f} GB/s), "
              f"torch.save {save['torch_save_s']:.3f} s, torch.save+fsync {save['torch_save_fsync_s']:.3f} s; "
              f"throughput ratio DCP/torch.save {save['throughput_ratio_vs_torch_save']:.2f} "
              f"(vs torch.save+fsync {save['throughput_ratio_vs_torch_save_fsync']:.2f})", flush=True)
        asy = bench_async(args, Path(d))
        print(f"{args.steps} steps of {asy['step_s']:.3f} s, a save every {args.every}: sync saves blocked "
              f"{asy['sync_blocked_s']:.2f} s; async blocked {asy['async_blocked_s']:.2f} s and slowed steps by "
              f"{asy['async_step_slowdown_s']:.2f} s; time lost to async saves = "
              f"{100 * asy['async_cost_fraction_of_sync']:.1f} % of synchronous (target < 10 %)", flush=True)
    print(json.dumps({**save, **asy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
