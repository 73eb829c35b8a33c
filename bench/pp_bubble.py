"""Measured pipeline bubble of the 1F1B schedule next to the theoretical (p-1)/(m+p-1).

    python bench/pp_bubble.py            # spawns 2 ranks with torchrun (p = 2), m in {2, 4, 8}

Each stage's busy time is the time spent inside its forward and backward compute (the schedule's
`forward_one_chunk` / `backward_one_chunk` calls, timed here); the rest of the step is waiting
for the other stage. bubble = 1 - busy / step time: the median over timed steps, averaged over the stages.
A microbatch has a fixed size, so a larger m is a larger batch. Never run with more ranks than
cores: waiting ranks would then also wait for a core.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MICRO = [2, 4, 8]
MICRO_BATCH, SEQ, WARMUP, STEPS = 4, 128, 2, 9


def timed(fn, acc: list):
    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        acc[0] += time.perf_counter() - t
        return out
    return wrapper


def worker() -> None:
    import torch
    import torch.distributed as dist
    from core.launch_config import LaunchConfig
    from launch.context import init_distributed, shutdown
    from parallel.apply import parallelize
    from parallel.mesh import build_mesh
    from core.run_config import load_config
    from trainer.model import Transformer
    from trainer.model_plan import parallel_plan

    torch.set_num_threads(1)
    ctx = init_distributed(LaunchConfig(), "cpu")
    rows = []
    for m in MICRO:
        cfg = load_config(str(ROOT / "configs/tiny.toml"), [
            "--model.dim", "256", "--model.n_layers", "4", "--model.n_heads", "4", "--train.seq_len", str(SEQ),
            "--train.batch_size", str(MICRO_BATCH * m), "--parallel.pp", str(ctx.world_size),
            "--parallel.pp_schedule", "1f1b", "--parallel.pp_microbatches", str(m)])
        dims = build_mesh(cfg.parallel, ctx)
        torch.manual_seed(0)
        par = parallelize(Transformer(cfg.model), dims, parallel_plan(cfg.model), cfg.parallel, cfg.precision)
        pipe = par.pipeline
        stage = pipe.schedule._stage
        busy = [0.0]
        stage.forward_one_chunk = timed(stage.forward_one_chunk, busy)
        stage.backward_one_chunk = timed(stage.backward_one_chunk, busy)
        x = torch.randint(0, cfg.model.vocab_size, (MICRO_BATCH * m, SEQ))
        fractions = []
        for step in range(WARMUP + STEPS):
            for p in par.model.parameters():
                p.grad = None
            dist.barrier()
            busy[0] = 0.0
            t = time.perf_counter()
            pipe.run(x, x)
            elapsed = time.perf_counter() - t
            if step >= WARMUP:
                fractions.append(1 - busy[0] / elapsed)
        mine = torch.tensor(sorted(fractions)[len(fractions) // 2])   # median: robust to a busy machine
        per_stage = [torch.zeros(()) for _ in range(ctx.world_size)]
        dist.all_gather(per_stage, mine)
        p = ctx.world_size
        rows.append((m, sum(t.item() for t in per_stage) / p, (p - 1) / (m + p - 1), [t.item() for t in per_stage]))
    if ctx.is_main:
        print(f"1F1B pipeline bubble, p = {ctx.world_size} stages, microbatch {MICRO_BATCH}x{SEQ} tokens, "
              f"4 layers of width 256, gloo on CPU")
        print(f"{'m':>3} {'measured':>9} {'theory':>9} {'measured/theory':>16}   per stage")
        for m, meas, theory, stages in rows:
            print(f"{m:>3} {meas:>9.3f} {theory:>9.3f} {meas / theory:>16.2f}   "
                  + " ".join(f"{f:.3f}" for f in stages))
    shutdown(ctx)


def main() -> None:
    if "RANK" in os.environ:
        worker()
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", os.environ.get("MASTER_PORT", "29517"), __file__]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))


if __name__ == "__main__":
    main()
