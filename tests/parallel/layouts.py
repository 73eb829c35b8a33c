"""Parity harness: run several parallel layouts inside ONE multi-process launch (start-up costs
more than the tiny runs) and record each layout's per-step losses and gradient norms, trained on
the built-in corpus through the real data loader (byte tokens, vocab 320).

Run by the tests as `torchrun --nproc_per_node N tests/parallel/layouts.py OUT.json NAME=ARGS ...`,
where ARGS are `--parallel.*` overrides separated by spaces. Rank 0 writes OUT.json.
`ARGS1 RESUME ARGS2` trains the first STEPS // 2 steps with ARGS1 (saving a checkpoint at the end),
then resumes the same run folder with ARGS2 for the rest: a layout that resumes exactly gives the
uninterrupted run's numbers.
"""
from __future__ import annotations

import faulthandler
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

GLOBAL_BATCH = 8
STEPS = 10
# lr 3e-3, not higher: Adam moves every weight by ~lr whatever the size of its gradient, so at
# lr 1e-2 rounding-level differences in near-zero gradients grow to ~1e-5 in the gradient norm
# within 5 steps even between two single-process runs that only sum the batch in another order.
# A tiny model with every dimension divisible by tp=2 and 4 layers for uneven/virtual stages.
# run.seed 1: with the per-parameter init (issue 16), seed 0's draw meets a gradient spike at steps
# 9-10 on this stream (norm 1.75 -> 3.97 -> 11.6, clipped; loss flat), where TP's other summation
# order grows to 9e-5 in the gradient norm: the chaotic regime described above, not a layout error
# (loss still within 1e-5). Seeds 1-3 show no spike (norms 1.1-2.5 throughout).
BASE = ["--run.seed", "1", "--model.dim", "32", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "2",
        "--model.vocab_size", "320", "--model.ffn_hidden", "64", "--train.seq_len", "32",
        "--train.steps", str(STEPS), "--train.eval_batches", "1", "--metrics.progress", "false",
        "--metrics.tensorboard", "false", "--metrics.log_every", "1", "--optim.warmup_steps", "2",
        "--optim.lr", "3e-3", "--optim.grad_clip", "1.0", "--checkpoint.every", "0", "--checkpoint.final", "false", "--train.threads", "1"]


# The first half of a RESUME layout: STEPS // 2 steps of the same schedule, saved at the end. The
# schedule's length stays STEPS (wsd with no decay: constant after warmup, whatever train.steps).
HALF = ["--train.steps", str(STEPS // 2), "--checkpoint.final", "true"]


def overrides(run_dir: str, dp: int, extra: list[str]) -> list[str]:
    return BASE + ["--run.dir", run_dir, "--train.batch_size", str(GLOBAL_BATCH // dp), *extra]


def run_layout(run_dir: str, extra: list[str], ctx=None, dp: int = 1) -> dict:
    """One layout on the REAL data stream (the built-in corpus through data/'s loader): every
    layout of the same global batch must see the same sequences at every step."""
    from core.run_config import load_config
    from trainer.train import train
    cfg = load_config("configs/tiny.toml", overrides(run_dir, dp, extra))
    train(cfg, ctx=ctx)
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()] \
        if (ctx is None or ctx.is_main) else []
    # a resumed run (see RESUME) appends to the folder's rows: keep the last row of each kind per step
    rows = list({(r["step"], "loss" in r): r for r in rows}.values())
    return {"loss": [r["loss"] for r in rows if "loss" in r], "grad_norm": [r["grad_norm"] for r in rows if "loss" in r],
            "val_loss": [r["val_loss"] for r in rows if "val_loss" in r], "run_dir": run_dir,
            "moe_dropped": [r["moe_dropped"] for r in rows if "moe_dropped" in r],
            "moe_load": [r["moe_load_max_mean"] for r in rows if "moe_load_max_mean" in r], "sockets": open_sockets()}


def open_sockets() -> int:
    """Sockets this process holds once a layout is over: gloo's connections of every process
    group still alive (train() destroys its mesh's groups; see parallel/mesh.py release_mesh)."""
    if not os.path.isdir("/proc/self/fd"):
        return -1
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:      # the listing's own descriptor, closed by now
            pass
    return count


INIT_FILE = "init.safetensors"


def write_initial_weights(path: str) -> None:
    """Initial weights of BASE's model drawn with ANOTHER seed (run.seed + 1) as a safetensors file
    in our names (`--checkpoint.init_from INIT_WEIGHTS`): a layout that ignored the file would
    train from run.seed's own weights and fail the comparison with a single process that loads it."""
    import torch
    from safetensors.torch import save_file
    from core.run_config import load_config
    from trainer.model import Transformer
    cfg = load_config("configs/tiny.toml", overrides(str(Path(path).parent / "w"), 1, []))
    with torch.device("meta"):
        model = Transformer(cfg.model)
    save_file({n: model.initial_value(n, p.shape, torch.device("cpu"), torch.float32, seed=cfg.run.seed + 1).contiguous()
               for n, p in model.named_parameters()}, path)


def dp_degree(extra: list[str], world: int) -> int:
    vals = dict(zip(extra[::2], extra[1::2]))
    fixed = int(vals.get("--parallel.pp", 1)) * int(vals.get("--parallel.tp", 1)) * int(vals.get("--parallel.cp", 1))
    return world // fixed


def main() -> None:
    import torch.distributed as dist
    from core.launch_config import LaunchConfig
    from launch.context import init_distributed, shutdown
    out, specs = sys.argv[1], sys.argv[2:]
    if os.environ.get("ND_DUMP_AFTER"):   # debugging hangs: print every thread's stack, then exit
        faulthandler.dump_traceback_later(float(os.environ["ND_DUMP_AFTER"]), exit=True)
    ctx = init_distributed(LaunchConfig(), "cpu")
    results = {}
    root = tempfile.mkdtemp(prefix="nd-parity-") if ctx.is_main else None
    if ctx.is_main and any("INIT_WEIGHTS" in spec for spec in specs):
        write_initial_weights(f"{root}/{INIT_FILE}")
    holder = [root]
    dist.broadcast_object_list(holder, src=0)   # also: the weights file exists before anyone reads it
    for spec in specs:
        name, _, args = spec.partition("=")
        extra = args.replace("INIT_WEIGHTS", f"{holder[0]}/{INIT_FILE}").split()
        first, resumed, extra = (extra[:extra.index("RESUME")], extra[extra.index("RESUME") + 1:], []) \
            if "RESUME" in extra else ([], [], extra)
        try:
            if first:
                run_layout(f"{holder[0]}/{name}", first + HALF, ctx, dp_degree(first, ctx.world_size))
                extra = resumed
            results[name] = run_layout(f"{holder[0]}/{name}", extra, ctx, dp_degree(extra, ctx.world_size))
        except Exception:  # report and go on: one broken layout should not hide the others
            results[name] = {"error": traceback.format_exc()}
            if not ctx.is_main:
                traceback.print_exc()
    if ctx.is_main:
        Path(out).write_text(json.dumps(results, indent=1))
    shutdown(ctx)


if __name__ == "__main__":
    main()
