"""Sharded init harness, run under torchrun by tests/parallel/test_sharded_init.py.

    init_worker.py state OUT_DIR NAME=ARGS ...   for each layout (ARGS: `--parallel.*`, model and
        `--checkpoint.init_from` overrides), build the model the way the trainer does (meta device,
        parallelize, fill the local shards; then load safetensors weights if init_from names them)
        and write its gathered full state dict to OUT_DIR/NAME.pt (rank 0), with whether a tied
        head still shares the embedding's parameter
    init_worker.py rss OUT.json ARGS ...         peak resident memory of each rank building and
        initialising the model (FSDP over all ranks), above the RSS it had before the build
"""
from __future__ import annotations

import json
import re
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from core.launch_config import LaunchConfig
from core.run_config import load_config
from launch.context import init_distributed, shutdown
from parallel.mesh import build_mesh
from trainer.checkpoint import CheckpointManager
from trainer.train import TrainState, build_model

SEED = 11
# Every dimension divisible by 2 and 4 (TP, FSDP) but the vocabulary odd under FSDP x2 chunks of
# its 4-row multiple: 130 rows over dp 2 -> 65 + 65, over tp 2 x dp 2 -> uneven 33 + 32 rows.
SMALL = ["--model.dim", "32", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "2",
         "--model.vocab_size", "130", "--model.ffn_hidden", "64", "--train.seq_len", "32", "--run.seed", str(SEED)]


def config(extra: list[str]):
    return load_config("configs/tiny.toml", ["--train.threads", "1", *extra])


def full_state(parts) -> dict:
    """Every parameter as a full plain tensor, gathered from all ranks (pipeline stages hold
    different keys): the value DCP or an export would see."""
    mine = {}
    for part in parts:
        mine.update(get_model_state_dict(part, options=StateDictOptions(full_state_dict=True)))
    mine = {k: v.detach().cpu().clone() for k, v in mine.items()}
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = {}
    for sd in everyone:
        merged.update(sd)
    return merged


def tied(parts, model_cfg) -> bool | None:
    """With tie_embeddings: is the head's weight still the embedding's parameter object?"""
    if not model_cfg.tie_embeddings:
        return None
    part = parts[0]
    return part.output.weight is part.tok_embeddings.weight


def run_state(out_dir: Path, specs: list[str], ctx) -> None:
    for spec in specs:
        name, _, args = spec.partition("=")
        try:
            cfg = config(SMALL + args.split())
            dims = build_mesh(cfg.parallel, ctx)
            par, _ = build_model(cfg, dims, ctx.device)
            if cfg.checkpoint.init_from:     # the trainer's own path for safetensors weights
                CheckpointManager(cfg, ctx, out_dir / name, model=par.model, optimizer=None, scheduler=None,
                                  loader=None, state=TrainState(), dims=dims).init_from(cfg.checkpoint.init_from)
            sd = full_state(par.model_parts)
            result = {"state": sd, "tied": tied(par.model_parts, cfg.model),
                      "meta_left": [n for p in par.model_parts for n, t in p.named_parameters() if t.is_meta]}
        except Exception:
            result = {"error": traceback.format_exc()}
            traceback.print_exc()
        if ctx.is_main:
            torch.save(result, out_dir / f"{name}.pt")
        dist.barrier()


def status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


def reset_peak() -> bool:
    """Linux resets VmHWM to the current RSS on writing 5 to clear_refs (since 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def run_rss(out: Path, args: list[str], ctx) -> None:
    cfg = config(args)
    dims = build_mesh(cfg.parallel, ctx)
    small = config(SMALL)             # warm the code paths the build takes (lazy imports, mesh caches)
    build_model(small, build_mesh(small.parallel, ctx), ctx.device)
    dist.barrier()
    reset = reset_peak()
    before = status_kib("VmRSS")
    par, whole = build_model(cfg, dims, ctx.device)
    peak = status_kib("VmHWM")
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local") else p.numel() * p.element_size()
                for part in par.model_parts for p in part.parameters())
    row = {"rank": ctx.rank, "baseline_kib": before, "peak_kib": peak, "peak_reset": reset,
           "local_param_bytes": local, "model_param_bytes": whole.num_params() * 4}
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if ctx.is_main:
        out.write_text(json.dumps(rows, indent=1))


def main() -> None:
    mode, out, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    ctx = init_distributed(LaunchConfig(), "cpu")
    torch.set_num_threads(1)
    try:
        if mode == "state":
            run_state(out, rest, ctx)
        else:
            run_rss(out, rest, ctx)
    finally:
        shutdown(ctx)


if __name__ == "__main__":
    main()
