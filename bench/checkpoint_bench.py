"""Checkpoint benchmark: synchronous DCP save throughput against torch.save of the same state,
and the training time an asynchronous save costs as a fraction of a synchronous one.

    python bench/checkpoint_bench.py [--dim 512 --layers 6 --vocab 16384 --every 2 --saves 30]

One process (never more ranks than cores). Prints one line per figure and a JSON summary.
Targets: save ratio near 1 (DCP's sharded writer no slower than torch.save), async cost < 10 %.
"""
from __future__ import annotations

import argparse
import json
import os
import random
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
from core.run_config import load_config  # noqa: E402
from parallel.local_engine import cross_entropy  # noqa: E402
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


def config(args, run_dir: Path, async_save: bool):
    return load_config(None, [
        "--model.dim", str(args.dim), "--model.n_layers", str(args.layers), "--model.n_heads", "8",
        "--model.vocab_size", str(args.vocab), "--run.dir", str(run_dir), "--checkpoint.keep", "1",
        "--checkpoint.async", str(async_save).lower(), "--train.steps", "1000"])


def manager(r, run_dir: Path, async_save: bool) -> CheckpointManager:
    return CheckpointManager(config(r.args, run_dir, async_save), DistContext(device=r.device), run_dir,
                             model=r.model, optimizer=r.opt, scheduler=r.sched, loader=r.loader, state=r.state)


def setup(args):
    cfg = config(args, Path("unused"), False)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Transformer(cfg.model).to(device)
    opt = build_optimizer(model, cfg.optim, device)
    sched = build_scheduler(opt, cfg.optim, 1000)
    return types.SimpleNamespace(args=args, device=device, model=model, opt=opt, sched=sched,
                                 loader=Batches(args.vocab, args.seq, args.batch), state=TrainState(), managers=[])


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
    r = setup(args)
    r.ckpt = manager(r, tmp / "save", False)
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


def run_steps(r, n: int) -> None:
    for _ in range(n):
        step(r)
        for ckpt in r.managers:
            if ckpt.writer is not None:
                ckpt.writer.poll()              # what the training loop does after each step
    sync(r)


def bench_async(args, tmp: Path) -> dict:
    """The training time a save costs, measured in one process as the difference between a
    window of `every` steps that begins with a save and the mean of the quiet windows of
    `every` steps on either side of it, so that drift in machine speed cancels. Sync and async
    saves alternate in the same loop (two checkpoint managers on the same model and optimizer):
    quiet, sync, quiet, async, quiet, sync, ... An async window ends by waiting for its write
    and commit, so a write that outlasts its window counts in full."""
    r = setup(args)
    r.ckpt, r.ckpt_async = manager(r, tmp / "sync", False), manager(r, tmp / "async", True)
    r.managers = [r.ckpt, r.ckpt_async]
    run_steps(r, 2)                              # warm-up; optimizer state exists

    def window(ckpt):
        t = time.perf_counter()
        if ckpt is not None:
            r.state.step += 1                   # a new checkpoint name each time
            ckpt.save()
        blocked = time.perf_counter() - t
        run_steps(r, args.every)
        if ckpt is not None and ckpt.writer is not None:
            t_wait = time.perf_counter()
            ckpt.writer.wait()
            blocked += time.perf_counter() - t_wait
        return time.perf_counter() - t, blocked

    window(r.ckpt_async)                        # the first async save allocates the staging buffers
    window(r.ckpt)
    costs = {"sync": [], "async": []}
    blocked = {"sync": [], "async": []}
    quiet = [window(None)[0]]
    for _ in range(args.saves):
        for mode, ckpt in (("sync", r.ckpt), ("async", r.ckpt_async)):
            t_save, b = window(ckpt)
            quiet.append(window(None)[0])
            costs[mode].append(t_save - (quiet[-2] + quiet[-1]) / 2)
            blocked[mode].append(b)
            if args.verbose:
                print(f"  {mode} save window {t_save:.3f} s (blocked {b:.3f} s), quiet windows {quiet[-2]:.3f} s, "
                      f"{quiet[-1]:.3f} s", flush=True)
    r.ckpt.finish()
    r.ckpt_async.finish()
    sync_cost, async_cost = (statistics.median(costs[m]) for m in ("sync", "async"))
    low, high = bootstrap_ratio(costs["async"], costs["sync"])
    return {"step_s": statistics.median(quiet) / args.every, "saves": args.saves, "steps_per_window": args.every,
            "sync_cost_s": sync_cost, "async_cost_s": async_cost,
            "sync_blocked_s": statistics.median(blocked["sync"]), "async_blocked_s": statistics.median(blocked["async"]),
            "async_cost_fraction_of_sync": async_cost / sync_cost, "fraction_95ci": [low, high]}


def bootstrap_ratio(a: list[float], b: list[float], n: int = 2000) -> tuple[float, float]:
    """95 % interval of median(a) / median(b), resampling each list (seeded: reproducible)."""
    rng = random.Random(0)
    ratios = sorted(statistics.median(rng.choices(a, k=len(a))) / statistics.median(rng.choices(b, k=len(b)))
                    for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--every", type=int, default=2, help="steps per window (a save every 2 windows)")
    p.add_argument("--saves", type=int, default=30, help="saves of each kind in the async benchmark")
    p.add_argument("--repeats", type=int, default=3, help="repeats of the sync save vs torch.save timing")
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
        print(f"steps of {asy['step_s']:.3f} s, windows of {args.every} steps, {args.saves} saves of each kind: "
              f"a sync save costs {asy['sync_cost_s']:.3f} s, an async save {asy['async_cost_s']:.3f} s "
              f"(loop blocked {asy['async_blocked_s']:.3f} s); time lost to async saves = "
              f"{100 * asy['async_cost_fraction_of_sync']:.1f} % of synchronous (95 % interval "
              f"{100 * asy['fraction_95ci'][0]:.1f}-{100 * asy['fraction_95ci'][1]:.1f} %; target < 10 %)", flush=True)
    print(json.dumps({**save, **asy}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
