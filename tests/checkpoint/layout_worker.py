"""For test_layouts: train a few steps with the CheckpointManager holding the model as a
pipeline rank does, resuming from whatever checkpoint the run folder holds.

    main(LAYOUT, RUN_DIR, STOP, OUT.json, use_async)

  parts2  one process holding two pipeline-stage modules (layers split 1+1) with an optimizer each:
          what a PP rank hands the checkpoint manager (`model_parts`)
  stages2 the same two stages as one nn.ModuleList with one optimizer over it (parallel/'s way)
  single  one process
"""
import copy
import json
import os
import sys
import types

import torch
import torch.distributed as dist

from tests.checkpoint.helpers import SMALL
from tests.trainer.fixtures import FixedBatches
from launch.context import DistContext
from trainer.checkpoint import CheckpointManager
from core.run_config import load_config
from parallel.local_engine import cross_entropy
from trainer.model import Transformer
from trainer.optim import build_optimizer, build_scheduler
from trainer.train import TrainState

GLOBAL_BATCH, TOTAL_STEPS = 4, 10


def apply_layout(model, layout, world):
    if layout in ("parts2", "stages2"):
        first, second = copy.deepcopy(model), copy.deepcopy(model)
        del first.layers["1"]
        first.norm, first.output = None, None
        del second.layers["0"]
        second.tok_embeddings = None
        parts = [first, second] if layout == "parts2" else [torch.nn.ModuleList([first, second])]
        return parts, dict(dp_rank=0, dp_size=1, dp_shard=1, tp=1)
    return [model], dict(dp_rank=0, dp_size=1, dp_shard=1, tp=1)


def main(layout, run_dir, stop, out, use_async=False):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    ctx = DistContext(rank=int(os.environ.get("RANK", "0")), world_size=world, backend="gloo" if world > 1 else "")
    torch.set_num_threads(1)
    cfg = load_config("configs/tiny.toml", SMALL + [
        "--run.dir", run_dir, "--train.steps", str(TOTAL_STEPS), "--checkpoint.async", str(use_async).lower(),
        "--optim.grad_clip", "0"])
    torch.manual_seed(cfg.run.seed)
    parts, d = apply_layout(Transformer(cfg.model), layout, world)
    optimizers = [build_optimizer(p, cfg.optim, torch.device("cpu")) for p in parts]
    schedulers = [build_scheduler(o, cfg.optim, TOTAL_STEPS) for o in optimizers]
    batch = GLOBAL_BATCH // d["dp_size"]
    loader = FixedBatches(320, cfg.train.seq_len, batch, 4, cfg.run.seed, d["dp_rank"], d["dp_size"])
    dims = types.SimpleNamespace(pp=1, dp_replicate=1, **d)
    state = TrainState()
    ckpt = CheckpointManager(cfg, ctx, run_dir, model=parts if len(parts) > 1 else parts[0],
                             optimizer=optimizers if len(parts) > 1 else optimizers[0],
                             scheduler=schedulers if len(parts) > 1 else schedulers[0],
                             loader=loader, state=state, dims=dims)
    ckpt.prepare_run_dir()
    ckpt.restore()
    losses, it = {}, iter(loader)
    while state.step < stop:
        inputs, labels = next(it)
        for o in optimizers:
            o.zero_grad()
        h = inputs
        for p in (parts[0] if isinstance(parts[0], torch.nn.ModuleList) else parts):
            h = p(h)
        loss = cross_entropy(h, labels)
        loss.backward()
        for o, s in zip(optimizers, schedulers):
            o.step()
            s.step()
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        state.step += 1
        losses[state.step] = value.item()
        ckpt.after_step(final=state.step == stop)
    ckpt.finish()
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump(losses, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], len(sys.argv) > 5 and sys.argv[5] == "async")
