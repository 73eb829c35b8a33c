"""`meshformer plan`: find the fastest layout that fits, or predict one layout's figures.

  meshformer plan --config FILE --cluster NAME --gpus N [--global-batch B] [--top K] [--section.key value ...]
  meshformer plan predict --config FILE --cluster NAME [--gpus N] [--section.key value ...]

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
from .search import explain, search


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config TOML (its [model], [parallel], [train], [precision])")
    p.add_argument("--cluster", required=True, help=f"cluster profile: {', '.join(list_clusters())} or a .toml path")


def _parsers() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    plan = ArgParser(
        prog="meshformer plan", description="rank parallel layouts by predicted throughput",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`meshformer plan predict ...` gives one layout's figures as JSON. Further `--section.key value`\n"
               "arguments override the run config (e.g. --model.n_layers 48); see parallel/planner/README.md.\n\n"
               + keys_help())
    _common(plan)
    plan.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    plan.add_argument("--global-batch", type=int, default=0,
                      help="sequences per optimizer step (default: the config's batch at this GPU count)")
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
        at_least("--global-batch", args.global_batch, 0, "sequences per step; 0 = the config's")
        at_least("--top", args.top, 1, "rows of the table")
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
    pred = predict(run.model, layout, cluster, Stack())
    out = {"cluster": cluster.name, "model_params": run.model.num_params(), **pred.to_dict()}
    print(json.dumps(out, indent=2))
    return 0


def _plan(args, run, cluster) -> int:
    own = None
    try:
        own = config_layout(run, args.gpus)
    except ValueError:
        pass                                   # the config's layout does not match this GPU count
    batch = args.global_batch or (own.global_batch if own else run.batch_size * run.grad_accum * args.gpus)
    if own and own.global_batch != batch:
        own = None
    result = search(run.model, cluster, args.gpus, batch, run.seq_len, run.dtype, Stack(),
                    extra=[own] if own else [])
    top = result.ranked[: args.top]
    if args.json:
        print(json.dumps([p.to_dict() for p in top], indent=2))
        return 0
    m = run.model
    print(f"model: {m.num_params() / 1e9:.3g}B params ({m.n_layers} layers, dim {m.dim}), seq {run.seq_len}, "
          f"{run.dtype}; {args.gpus} x {cluster.name}; global batch {batch} sequences")
    print(f"layouts tried {result.tried}, fit {len(result.ranked)}; rejected: "
          + (", ".join(f"{n} {r}" for r, n in result.rejected.most_common()) or "none"))
    print()
    print(f"{'#':>3}  {'layout':<58} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU':>6} {'step s':>8} {'mem GiB':>8}")
    for i, p in enumerate(top, 1):
        print(f"{i:>3}  {p.layout.short():<58} {p.tokens_per_s:>11,.0f} {p.model_tflops_per_gpu:>8.1f} "
              f"{p.mfu:>6.1%} {p.time.step:>8.3f} {p.memory.total / 1024 ** 3:>8.1f}")
    print()
    for i, p in enumerate(top[:3], 1):
        print(f"#{i}: {explain(p)}")
    if own:
        rank = next((i for i, p in enumerate(result.ranked, 1) if p.layout == own), None)
        where = f"ranked {rank} of {len(result.ranked)}" if rank else "does not fit"
        print(f"\nthe config's own layout ({own.short()}) {where}")
    print("\nwinner as config overrides:\n  " + " ".join(top[0].layout.overrides()))
    return 0
