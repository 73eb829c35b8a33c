"""The training job: the walk a batch takes, from config to metrics and checkpoints."""
from __future__ import annotations

import contextlib
import functools
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

import data as data_pkg
from core.errors import TrainingDiverged
from core.layout import validate_layout
from core.run_config import Config
from launch.context import DistContext, init_distributed, shutdown
from launch.watchdog import stall_watchdog
from parallel.apply import Parallelized, parallelize
from parallel.dims import ParallelDims
from parallel.mesh import build_mesh, release_mesh
from parallel.sharded_init import ParamInit
from trainer.checkpoint import CheckpointManager, complete_checkpoints
from trainer.console import closing_line, complete_line
from trainer.divergence import Divergence, DivergenceGuard
from trainer.memory_check import check_memory
from trainer.metrics import MetricsLogger, peak_flops, peak_memory_gib, strict
from trainer.roofline import measured_peak_flops
from trainer.model import Transformer
from trainer.model_plan import parallel_plan
from trainer.moe import moe_metrics
from trainer.optim import build_optimizer, build_scheduler
from trainer.run_folder import carry_tokenizer, read_tokenizer_file
from trainer.run_lock import hold_run_dir
from trainer.trackers import check_trackers, open_trackers
from trainer.vocab import resolve_vocab

LoaderFactory = Callable[..., object]


@dataclass
class TrainState:
    """What a checkpoint holds besides model and optimizer; the loop advances it."""
    step: int = 0
    tokens: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def build_loaders(cfg: Config, dims: ParallelDims, factory: LoaderFactory | None):
    """Train and validation loaders for this rank's data-parallel coordinate: tensor- and
    pipeline-parallel peers of one replica pass the same dp_rank and so see the same batches.
    The built-in loader also gets grad_accum: it cuts the global batch (dp_size x grad_accum x
    batch_size sequences) the same way in every layout. A custom factory hands out its own order."""
    factory = factory or functools.partial(data_pkg.build_loader, grad_accum=cfg.train.grad_accum)
    common = dict(seq_len=cfg.train.seq_len, batch_size=cfg.train.batch_size,
                  dp_rank=dims.dp_rank, dp_size=dims.dp_size, seed=cfg.run.seed)
    train = factory(cfg.data, split="train", **common)
    val = factory(cfg.data, split="val", **common) if cfg.train.eval_batches else None
    return train, val


def take(it: Iterator, n: int) -> list:
    return [next(it) for _ in range(n)]


def evaluate(engine, val_loader, n_steps: int, grad_accum: int = 1) -> float:
    """Mean loss over the first `n_steps` validation steps (global batches: grad_accum micro-batches
    per rank, as in training) of the (finite, fixed) validation pass."""
    return engine.eval_loss(list(itertools.islice(iter(val_loader), n_steps * grad_accum)))


def build_model(cfg: Config, dims: ParallelDims, device: torch.device) -> tuple[Parallelized, Transformer]:
    """This rank's part of the model, initialised: built on the meta device (no memory),
    parallelized there, then each rank allocates and fills only its own shards with the model's
    per-parameter initial values (parallel/sharded_init.py), so no rank ever holds the whole model
    and every layout starts from the single-process weights of run.seed. Also returns the whole
    model on the meta device (shapes, counts, FLOPs)."""
    with torch.device("meta"):
        whole = Transformer(cfg.model)
    whole.init_buffers(device)       # position tables: small, computed before the split
    init = ParamInit(device, functools.partial(whole.initial_value, seed=cfg.run.seed))
    return parallelize(whole, dims, parallel_plan(cfg.model), cfg.parallel, cfg.precision, init=init), whole


def train(cfg: Config, *, loader_factory: LoaderFactory | None = None, ctx: DistContext | None = None,
          dry_run: bool = False) -> dict:
    """Run the job described by `cfg`; returns the summary also written to run.dir/summary.json.
    dry_run: build everything (layout, model, optimizer, data loaders, one batch read) and stop
    before the first step, leaving run.dir untouched."""
    own_ctx = ctx is None
    check_trackers(cfg.metrics)          # a missing tracker package is bad input: say so before any work
    ctx = ctx or init_distributed(cfg.launch, cfg.train.device)
    try:
        held = contextlib.nullcontext() if dry_run else hold_run_dir(Path(cfg.run.dir), ctx)
        # the stack releases the mesh's process groups when the run ends (parallel/mesh.py: release_mesh)
        with held, stall_watchdog(ctx, cfg.launch.timeout_s) as beat, contextlib.ExitStack() as cleanup:
            return _train(cfg, ctx, loader_factory, beat, dry_run, cleanup)
    finally:
        if own_ctx:
            shutdown(ctx)


def _train(cfg: Config, ctx: DistContext, loader_factory: LoaderFactory | None, beat,
           dry_run: bool, cleanup: contextlib.ExitStack) -> dict:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    run_dir = Path(cfg.run.dir)
    vocab_from = "model.vocab_size"
    # a custom loader brings its own token ids (but a doc_mask model still needs the tokenizer's end-of-text)
    if loader_factory is None or not cfg.model.vocab_size or (cfg.model.doc_mask and cfg.model.eot_id < 0):
        vocab_from = resolve_vocab(cfg.model, data_pkg.build_tokenizer(cfg.data), cfg.data.tokenizer)
    # The layout against the model first: its errors (e.g. parallel.ep without experts) name the
    # model's fields, which the world-size arithmetic in build_mesh cannot.
    validate_layout(cfg.parallel, cfg.model, cfg.train.batch_size, cfg.train.seq_len)
    dims = build_mesh(cfg.parallel, ctx)
    cleanup.callback(release_mesh, dims)
    check_memory(cfg, ctx)              # before anything large is allocated: refuse a run that cannot fit
    tokenizer_file = read_tokenizer_file(cfg) if loader_factory is None and ctx.is_main else None

    seed_everything(cfg.run.seed)
    par, whole = build_model(cfg, dims, ctx.device)
    n_params, n_body = whole.num_params(), whole.num_params(include_embedding=False)
    flops_per_token = whole.flops_per_token(cfg.train.seq_len)     # MoE: the experts a token uses (MFU stays honest)
    model = par.model                    # one module, or a ModuleList of this rank's pipeline stages
    optimizer = build_optimizer(model, cfg.optim, ctx.device)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    engine = par.make_engine(optimizer, scheduler, ctx.device, cfg.precision, cfg.optim.grad_clip,
                             micro_batch=cfg.train.batch_size, grad_accum=cfg.train.grad_accum,
                             local_rank=ctx.local_rank)
    train_loader, val_loader = build_loaders(cfg, dims, loader_factory)
    if dry_run:
        return _dry_run(cfg, ctx, dims, n_params, train_loader)

    state = TrainState()
    guard = DivergenceGuard(cfg.train, ctx, model, optimizer)
    ckpt = CheckpointManager(cfg, ctx, run_dir, model=model, optimizer=optimizer, scheduler=scheduler,
                             loader=train_loader, state=state, dims=dims, before_save=guard.before_save,
                             parts=getattr(engine, "checkpoint_parts", None))
    ckpt.prepare_run_dir()
    ckpt.restore()
    if ctx.distributed:   # every rank has looked at the run folder before rank 0 writes into it
        torch.distributed.barrier()
    if state.step >= cfg.train.steps and complete_checkpoints(ckpt.root):   # a finished run, started again
        return _already_complete(cfg, ctx, ckpt, state)
    if ctx.is_main:                      # the folder exists: hold_run_dir made it to lock it
        (run_dir / "config.toml").write_text(carry_tokenizer(cfg, run_dir, tokenizer_file).to_toml())

    log = MetricsLogger(run_dir, ctx.is_main, cfg.train.steps, state.step, cfg.metrics.progress, cfg.metrics.tensorboard,
                        sinks=open_trackers(cfg, run_dir) if ctx.is_main else ())
    active = (f", {cfg.model.num_params(active=True) / 1e6:.2f}M active per token "
              f"({cfg.model.moe_top_k} of {cfg.model.moe_experts} experts)") if cfg.model.moe_experts else ""
    log.message(f"model: {n_params / 1e6:.2f}M parameters ({n_body / 1e6:.2f}M without embeddings{active}), "
                f"{flops_per_token / 1e6:.1f} MFLOP/token; vocabulary {cfg.model.vocab_size} ({vocab_from}); "
                f"world {ctx.world_size} on {ctx.device.type}"
                + (f" (launched by {ctx.launcher})" if ctx.launcher != "none" else "") + "; "
                f"run folder {run_dir}" + (f"; resumed at step {state.step}" if state.step else ""))
    for note in par.notes:               # e.g. what a user's ds_config.json changed
        log.message(note)
    if val_loader is None and cfg.train.eval_batches:
        log.message("no validation data (data.val_urls is empty and data.urls has no val/ split from `meshformer "
                    "prepare`): training without evaluation")
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len * dims.dp_size
    per_device = peak_flops(ctx.device, cfg.precision.dtype, cfg.metrics.peak_tflops, cfg.metrics.cpu_peak_tflops,
                            lambda: measured_peak_flops(cfg.model, cfg.train.batch_size, cfg.train.seq_len, cfg.precision.dtype))
    if ctx.device.type != "cuda" and not cfg.metrics.peak_tflops and not cfg.metrics.cpu_peak_tflops:
        log.message(f"mfu: this process's {cfg.precision.dtype} matmuls at the model's shapes reach "
                    f"{per_device / 1e9:.3g} GFLOP/s (timed now, trainer/roofline.py); MFU is the step's share of that")
    peak = per_device * ctx.world_size

    if val_loader is not None and state.step == 0:   # the starting point the demo's drop is measured from
        val = evaluate(engine, val_loader, cfg.train.eval_batches, cfg.train.grad_accum)
        log.log({"step": 0, "val_loss": val, "val_ppl": float(torch.tensor(val).exp())})
    it = iter(train_loader)
    last = {"loss": float("nan"), "val_loss": float("nan")}
    start_wall, window_t, window_steps = time.perf_counter(), time.perf_counter(), 0
    try:
        while state.step < cfg.train.steps:
            lr = scheduler.get_last_lr()[0]
            # Nothing of the step is read on the host here (a read waits for the device's queue):
            # loss and norm stay on the device until a logging step; the guard notes a non-finite
            # one on the device too (under train.on_nonfinite = skip the engine reads each step).
            out = engine.train_step(take(it, cfg.train.grad_accum), skip_nonfinite=guard.skip_updates)
            state.step += 1
            state.tokens += tokens_per_step
            window_steps += 1
            log.advance()
            if out.skipped:
                log.log({"step": state.step, "skipped": "non-finite loss or gradient norm", "lr": lr})
            elif out.unlabelled:   # an epoch's padded end: no label anywhere in the global batch, no update
                log.log({"step": state.step, "skipped": "no labelled token in the global batch", "lr": lr})
            guard.observe(state.step, out)
            final = state.step == cfg.train.steps
            evaluate_now = val_loader is not None and (
                final or bool(cfg.train.eval_every and state.step % cfg.train.eval_every == 0))
            try:
                if (state.step % cfg.metrics.log_every == 0 or final) and not (out.skipped or out.unlabelled):
                    if ctx.device.type == "cuda":
                        torch.cuda.synchronize()
                    now = time.perf_counter()
                    tps = window_steps * tokens_per_step / (now - window_t)
                    window_t, window_steps = now, 0
                    last["loss"] = engine.reduce_loss(out.loss).item()     # a collective under data parallel
                    log.log({"step": state.step, "loss": last["loss"], "lr": lr, "grad_norm": out.grad_norm.item(),
                             "tokens": state.tokens, "tokens_per_s": tps, "mfu": tps * flops_per_token / peak,
                             "peak_mem_gib": peak_memory_gib(ctx.device), **moe_metrics(model)})
                    guard.check(state.step)
                if evaluate_now:
                    guard.check(state.step)          # a diverged model is not worth evaluating
                    val = evaluate(engine, val_loader, cfg.train.eval_batches, cfg.train.grad_accum)
                    last["val_loss"] = val
                    log.log({"step": state.step, "val_loss": val, "val_ppl": float(torch.tensor(val).exp())})
                    window_t = time.perf_counter()   # evaluation time is not training throughput
                ckpt.after_step(final=final)         # each save checks the guard first
            except Divergence as d:                  # rollback, else TrainingDiverged
                from_step, loaded = guard.recover(d, ckpt)
                log.rewind(state.step)
                log.log({"step": state.step, "rollback_from": from_step, "diverged_at": d.step,
                         "data_steps_skipped": from_step - state.step, "checkpoint": loaded.name})
                skipped = f"steps {state.step + 1}-{from_step}" if from_step > state.step + 1 else f"step {from_step}"
                log.message(f"training diverged at step {d.step}: {d.what()}; rolled back to {loaded} "
                            f"(rollback {guard.rollbacks} of train.max_rollbacks = {cfg.train.max_rollbacks}); "
                            f"the data of {skipped} is skipped")
                window_t, window_steps = time.perf_counter(), 0
            beat(state.step)            # progress, for launch/watchdog.py (a rank stuck for launch.timeout_s is named)
            if ckpt.preempted:          # a termination signal: saved; the CLI exits with EXIT_PREEMPTED
                break
    except TrainingDiverged:
        ckpt.finish()                   # a save in flight holds a checked state: let it commit
        log.close()
        raise
    beat(None)
    ckpt.finish()
    log.close()

    summary = {"final_loss": last["loss"], "final_val_loss": last["val_loss"], "steps": state.step,
               "tokens": state.tokens, "wall_s": round(time.perf_counter() - start_wall, 3),
               "n_params": n_params, "n_params_non_embedding": n_body, "flops_per_token": flops_per_token,
               # what one token uses (a MoE model's top-k experts; = the above for a dense model): the N
               # of scaling sweeps that compare dense and MoE models at equal active compute
               "n_params_active": cfg.model.num_params(active=True),
               "n_params_active_non_embedding": cfg.model.num_params(include_embedding=False, active=True),
               "world_size": ctx.world_size, "preempted": ckpt.preempted}
    if ctx.is_main:   # strict JSON: a value never computed (no validation split) is null
        text = json.dumps({k: strict(v) for k, v in summary.items()}, indent=2, allow_nan=False)
        (run_dir / "summary.json").write_text(text + "\n")
        saved = complete_checkpoints(ckpt.root)
        stopped_by = ckpt.preemption.signal_name if ckpt.preempted else ""
        log.say(closing_line(summary, cfg.train.steps, str(saved[-1]) if saved else None,
                             "Ctrl-C (SIGINT)" if stopped_by == "SIGINT" else stopped_by))
    return summary


def _already_complete(cfg: Config, ctx: DistContext, ckpt: CheckpointManager, state: TrainState) -> dict:
    """A rerun of a finished run trains nothing and changes nothing: one line says so and how to
    go on; the summary is the finished run's (summary.json), marked complete."""
    ckpt.finish()
    path = Path(cfg.run.dir) / "summary.json"
    summary = json.loads(path.read_text()) if path.exists() else {"steps": state.step, "tokens": state.tokens}
    if ctx.is_main:
        newest = complete_checkpoints(ckpt.root)[-1]
        print(complete_line(cfg.run.dir, state.step, cfg.train.steps, str(newest)), flush=True)
    return {**summary, "preempted": False, "complete": True}


def _dry_run(cfg: Config, ctx: DistContext, dims: ParallelDims, n_params: int, train_loader) -> dict:
    """Everything is built; read one batch (the data path is the likeliest to be wrong) and stop."""
    inputs, _ = next(iter(train_loader))
    layout = " x ".join(f"{k} {getattr(dims, k)}" for k in ("pp", "dp_replicate", "dp_shard", "tp"))
    layout += f" (ep {dims.ep} within dp_shard)" if dims.ep_enabled else ""
    if ctx.is_main:
        print(f"dry run: built the model ({n_params / 1e6:.2f}M parameters), the layout ({layout} on world "
              f"{ctx.world_size}), the optimizer and the data loaders, and read a batch of {tuple(inputs.shape)} "
              f"tokens; stopping before step 1 (nothing written to {cfg.run.dir})", flush=True)
    return {"dry_run": True, "n_params": n_params, "world_size": ctx.world_size, "preempted": False}
