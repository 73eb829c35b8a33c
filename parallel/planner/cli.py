"""`meshformer plan`: find the fastest layout that fits, or predict one layout's figures.

  meshformer plan --config FILE --cluster NAME --gpus N [--global-batch-tokens T | --global-batch B]
                  [--max-memory-fraction F] [--top K] [--section.key value ...]
  meshformer plan predict --config FILE --cluster NAME [--gpus N] [--section.key value ...]
  meshformer plan calibrate [...]   (trainer/calibrate.py: it runs training, which this package cannot import)

Overrides after the known options change the run config before planning (e.g. the model size);
under `predict` they also choose the layout (`--parallel.tp 8 --parallel.pp 4 ...`).
"""
from __future__ import annotations

import argparse
import json
import sys

from core.cli_args import ArgParser, at_least
from core.errors import MeshformerError, UsageError, report_errors
from core.run_config import keys_help

from .cluster import list_clusters, load_cluster
from .layout import Stack
from .predict import predict
from .run_config import config_layout, default_gpus, read_run_config
from .offload import STATE_SHARE, OffloadPrediction, predict_offload, search_offload, state_share
from .search import NoLayoutFits, explain, search

# Llama 2 and 3 pretraining's global batch (4M tokens). Fixed, whatever --gpus, so that plans for
# different GPU counts compare the same work per optimizer step.
DEFAULT_BATCH_TOKENS = 4 * 1024 ** 2
# Layouts predicted above this fraction of GPU memory rank after all the others: the activation and
# transient terms are estimates, and a layout at 79.7 of 80 GiB is one surprise away from OOM.
DEFAULT_MAX_MEMORY_FRACTION = 0.9
# DeepSpeed offload is shown beside the best torch layout when it is predicted faster, when #1 is
# tight, or when it is predicted within this fraction of #1's tokens/s (close enough that the
# model's error could swap them) and the sharded model state crowds the GPUs (offload.STATE_SHARE).
# Always shown when no torch layout fits.
OFFLOAD_WITHIN = 0.10

LEGEND = """\
layout notation (the winner is spelled out as config overrides below):
  tp8+sp       tensor parallel over 8 GPUs (+sp: sequence parallel on norms and residuals)
  pp4x2        4 pipeline stages, 2 model chunks (virtual stages) per GPU for the interleaved schedule
  dp2x32       data parallel: 2 replicas (DDP; HSDP with FSDP inside) x 32 FSDP shards
  ep4          expert parallel (MoE): experts split over 4 of the FSDP shard ranks
  mb1x16       micro-batches of 1 sequence, 16 of them per data-parallel rank per optimizer step
               (pipeline microbatches, or gradient accumulation steps without PP)
  1f1b, zero_bubble, interleaved_1f1b   the pipeline schedule ('-' without PP)
  ac=none|selective|full                activation checkpointing
  mem GiB      predicted peak per GPU (worst pipeline stage), the allocator margin included;
               * = above --max-memory-fraction of GPU memory: ranked after every layout below it"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config TOML (its [model], [parallel], [train], [precision])")
    p.add_argument("--cluster", required=True, help=f"cluster profile: {', '.join(list_clusters())} or a .toml path")


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    plan = ArgParser(
        prog="meshformer plan", description="rank parallel layouts by predicted throughput",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`meshformer plan predict ...` gives one layout's figures as JSON. `meshformer plan calibrate` times\n"
               "short runs on this machine's ranks and writes a fitted profile for --cluster. Further `--section.key value`\n"
               "arguments override the run config (e.g. --model.n_layers 48); see parallel/planner/README.md.\n\n"
               + keys_help())
    _common(plan)
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    plan.add_argument("--global-batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS,
                      help=f"tokens per optimizer step, the same whatever --gpus (default {DEFAULT_BATCH_TOKENS:,}, "
                           "Llama pretraining's 4M); in whole sequences of train.seq_len")
    plan.add_argument("--global-batch", type=int, default=0,
                      help="sequences per optimizer step; given, it replaces --global-batch-tokens")
    plan.add_argument("--max-memory-fraction", type=float, default=DEFAULT_MAX_MEMORY_FRACTION,
                      help="layouts predicted above this fraction of GPU memory rank after all the others "
                           f"(default {DEFAULT_MAX_MEMORY_FRACTION}; 1 = rank by speed alone)")
    plan.add_argument("--top", type=int, default=10, help="rows of the table")
    plan.add_argument("--json", action="store_true", help="print the ranked predictions as JSON instead")
    pred = ArgParser(
        prog="meshformer plan predict", description="predict memory and speed of one layout",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The layout is the config's, changed by `--parallel.* / --train.* / --precision.*` overrides.\n\n"
               + keys_help())
    _common(pred)
    pred.add_argument("--gpus", type=int, default=0,
                      help="number of GPUs (default: tp x pp x dp_replicate x dp_shard, with dp_shard = -1 read as 1)")
    return plan, pred


def main(argv: list[str] | None = None, debug: bool = False) -> int:
    return report_errors("meshformer plan", lambda: _main(argv), debug)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan_p, pred_p = _parsers()
    is_predict = bool(argv) and argv[0] == "predict"
    if argv and argv[0] in ("predict", "search"):
        argv = argv[1:]
    parser = pred_p if is_predict else plan_p
    args, overrides = parser.parse_known_args(argv)
    if is_predict:
        at_least("--gpus", args.gpus, 0, "0 = the config's layout")
    else:
        at_least("--gpus", args.gpus, 1)
        at_least("--global-batch", args.global_batch, 0, "sequences per step; 0 = from --global-batch-tokens")
        at_least("--global-batch-tokens", args.global_batch_tokens, 1, "tokens per optimizer step")
        at_least("--top", args.top, 1, "rows of the table")
        if not 0 < args.max_memory_fraction <= 1:
            raise UsageError(f"--max-memory-fraction: {args.max_memory_fraction} must be in (0, 1], "
                             f"e.g. {DEFAULT_MAX_MEMORY_FRACTION}")
    try:
        cluster = load_cluster(args.cluster)
        run = read_run_config(args.config, overrides)
        if is_predict:
            return _predict(args, run, cluster)
        return _plan(args, run, cluster)
    except MeshformerError:
        raise
    except (ValueError, FileNotFoundError) as e:     # the planner's own checks (cluster files, fit)
        raise UsageError(str(e)) from e


def _predict(args, run, cluster) -> int:
    gpus = args.gpus
    gpus = gpus or default_gpus(run)
    layout = config_layout(run, gpus)
    par = run.parallel
    if par.engine == "deepspeed" and par.zero_stage == 3 and par.offload_optimizer == "cpu":
        off = predict_offload(run.model, layout, cluster, par.offload_param == "cpu")
        out = {"cluster": cluster.name, "model_params": run.model.num_params(), "engine": "deepspeed", **off.to_dict()}
        print(json.dumps(out, indent=2))
        return 0
    pred = predict(run.model, layout, cluster, Stack())
    out = {"cluster": cluster.name, "model_params": run.model.num_params(), **pred.to_dict()}
    print(json.dumps(out, indent=2))
    return 0


def global_batch(args, seq_len: int) -> tuple[int, str]:
    """Sequences per optimizer step, and how the number was chosen (for the header)."""
    if args.global_batch:
        return args.global_batch, "--global-batch"
    if args.global_batch_tokens < seq_len:
        raise UsageError(f"--global-batch-tokens: {args.global_batch_tokens} is less than one sequence "
                         f"(train.seq_len = {seq_len})")
    if args.global_batch_tokens == DEFAULT_BATCH_TOKENS:
        return DEFAULT_BATCH_TOKENS // seq_len, "the default 4M tokens; --global-batch-tokens or --global-batch to change"
    return args.global_batch_tokens // seq_len, f"--global-batch-tokens {args.global_batch_tokens:,}"


def _own_layout(run, gpus: int, batch: int):
    """The config's layout at this GPU count, its accumulation (or pipeline microbatches) scaled to
    the planned global batch so that it is compared on the same work; None if it cannot be."""
    try:
        own = config_layout(run, gpus)
    except ValueError:
        return None                            # the config's layout does not match this GPU count
    per_rank, rest = divmod(batch, own.dp)
    if rest or per_rank % own.micro_batch:
        return None
    return own.replace(microbatches=per_rank // own.micro_batch)


def offload_beside(speed_ratio: float, best_is_tight: bool, share: float) -> bool:
    """Whether the offload layout, at `speed_ratio` x #1's tokens/s, is shown beside the torch table."""
    return speed_ratio > 1 or best_is_tight or (speed_ratio >= 1 - OFFLOAD_WITHIN and share >= STATE_SHARE)


def _header(args, run, cluster, batch: int, how: str) -> None:
    m = run.model
    print(f"model: {m.num_params() / 1e9:.3g}B params ({m.n_layers} layers, dim {m.dim}), seq {run.seq_len}, "
          f"{run.dtype}; {args.gpus} x {cluster.name} ({cluster.gpu_memory_gib:g} GiB each)")
    print(f"global batch: {batch} sequences x {run.seq_len} = {batch * run.seq_len:,} tokens per optimizer step "
          f"({how}; the same whatever --gpus)")


def _offload_lines(off: OffloadPrediction) -> str:
    return (f"  {off.short()}: {off.tokens_per_s:,.0f} tokens/s\n    {off.describe()}\n"
            f"    as config overrides: {' '.join(off.overrides())}")


def _plan(args, run, cluster) -> int:
    batch, how = global_batch(args, run.seq_len)
    own = _own_layout(run, args.gpus, batch)
    offload = search_offload(run.model, cluster, args.gpus, batch, run.seq_len, run.dtype)
    try:
        result = search(run.model, cluster, args.gpus, batch, run.seq_len, run.dtype, Stack(),
                        extra=[own] if own else [], headroom=args.max_memory_fraction)
    except NoLayoutFits as e:
        off = offload.best
        if off is None:
            raise UsageError(f"{e}; DeepSpeed ZeRO-3 + CPU offload does not fit either ({offload.why_not()})") from None
        if args.json:
            print(json.dumps([{"engine": "deepspeed", **off.to_dict()}], indent=2))
            return 0
        _header(args, run, cluster, batch, how)
        print(f"\nno torch layout fits ({e.reasons}); "
              f"it fits with DeepSpeed ZeRO-3 + CPU offload:")
        print(_offload_lines(off))
        print("\nwinner as config overrides:\n  " + " ".join(off.overrides()))
        return 0
    top = result.ranked[: args.top]
    if args.json:
        print(json.dumps([{**p.to_dict(), "tight": result.tight(p)} for p in top], indent=2))
        return 0
    _header(args, run, cluster, batch, how)
    tight = sum(result.tight(p) for p in result.ranked)
    print(f"layouts tried {result.tried}, fit {len(result.ranked)} ({tight} of them above "
          f"{args.max_memory_fraction:.0%} of GPU memory, ranked last); rejected: "
          + (", ".join(f"{n} {r}" for r, n in result.rejected.most_common()) or "none"))
    print()
    print(f"{'#':>3}  {'layout':<58} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'step s':>8} {'mem GiB':>8}")
    for i, p in enumerate(top, 1):
        mem = f"{p.memory.total / 1024 ** 3:.1f}" + ("*" if result.tight(p) else " ")
        print(f"{i:>3}  {p.layout.short():<58} {p.tokens_per_s:>11,.0f} {p.model_tflops_per_gpu:>8.1f} "
              f"{p.mfu:>6.1%} {p.time.step:>8.3f} {mem:>9}")
    print()
    for i, p in enumerate(top[:3], 1):
        print(f"#{i}: {explain(p)}")
    if own:
        rank = next((i for i, p in enumerate(result.ranked, 1) if p.layout == own), None)
        where = f"ranked {rank} of {len(result.ranked)}" if rank else "does not fit"
        print(f"\nthe config's own layout ({own.short()}) {where}")
    off = offload.best
    if off and offload_beside(off.tokens_per_s / top[0].tokens_per_s, result.tight(top[0]),
                              state_share(run.model, cluster, args.gpus)):
        print(f"\nDeepSpeed ZeRO-3 + CPU offload, {off.tokens_per_s / top[0].tokens_per_s:.0%} of #1's tokens/s "
              "(predicted; DeepSpeed's own per-layer hook costs are not modelled):")
        print(_offload_lines(off))
    print("\n" + LEGEND)
    print("\nwinner as config overrides:\n  " + " ".join(top[0].layout.overrides()))
    return 0
