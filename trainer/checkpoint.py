"""Checkpoints of the whole training state with torch.distributed.checkpoint (DCP).

Layout: run.dir/checkpoints/step-00000100/ holds DCP shards of model + optimizer, `train.json`
(step, tokens, LR schedule; written by rank 0), `rank-<r>.json` (this rank's data-loader position
and RNG state) and, last, `COMPLETE`. A folder is written under a temporary name and renamed
when complete, so a crash mid-save never leaves a half checkpoint that looks finished.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainer.config_parse import ConfigError

COMPLETE = "COMPLETE"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


class CheckpointManager:
    def __init__(self, cfg, ctx, run_dir: Path, *, model, optimizer, scheduler, loader, state):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.root = run_dir / "checkpoints"
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.loader, self.state = loader, state
        self.last_save_time = time.monotonic()

    # ---- run folder -------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """A run folder with a previous run is resumed if it has a checkpoint; otherwise starting
        over it needs run.overwrite, which moves the old files aside (nothing is deleted)."""
        has_run = (self.run_dir / "metrics.jsonl").exists()
        if self.cfg.run.overwrite and (has_run or self.root.exists()):
            if self.ctx.is_main:
                aside = self.run_dir.with_name(f"{self.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                self.run_dir.rename(aside)
                print(f"run.overwrite: moved the previous run to {aside}", flush=True)
            self._barrier()
            return
        if has_run and not complete_checkpoints(self.root):
            raise ConfigError(f"run.dir: {str(self.run_dir)!r} already holds a run with no complete checkpoint to "
                              "resume; pick another run.dir or pass --run.overwrite true (the old run is moved aside)")

    # ---- restore ---------------------------------------------------------------------------
    def restore(self) -> bool:
        ckpts = complete_checkpoints(self.root)
        if not ckpts:
            return False
        self.load(ckpts[-1])
        return True

    def load(self, path: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        sd = {"model": model_sd, "optim": optim_sd}
        dcp.load(sd, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        meta = json.loads((path / "train.json").read_text())
        self.state.step, self.state.tokens = meta["step"], meta["tokens"]
        self.scheduler.load_state_dict(meta["scheduler"])
        rank_file = path / f"rank-{self.ctx.rank}.json"
        if rank_file.is_file():
            mine = json.loads(rank_file.read_text())
            if mine.get("loader") is not None and hasattr(self.loader, "load_state_dict"):
                self.loader.load_state_dict(mine["loader"])
            torch.set_rng_state(torch.tensor(mine["rng"], dtype=torch.uint8))

    # ---- save ------------------------------------------------------------------------------
    def _due(self, final: bool) -> bool:
        c, step = self.cfg.checkpoint, self.state.step
        if final and c.final:
            return True
        if c.every and step % c.every == 0:
            return True
        if step in c.at_steps:
            return True
        return bool(c.every_minutes) and time.monotonic() - self.last_save_time >= 60 * c.every_minutes

    def after_step(self, final: bool = False) -> None:
        if self._due(final):
            self.save()

    def save(self) -> Path:
        name = step_dir_name(self.state.step)
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        (tmp / f"rank-{self.ctx.rank}.json").write_text(
            json.dumps({"loader": loader_state, "rng": torch.get_rng_state().tolist()}))
        self._barrier()
        if self.ctx.is_main:
            meta = {"step": self.state.step, "tokens": self.state.tokens, "scheduler": self.scheduler.state_dict(),
                    "world_size": self.ctx.world_size}
            (tmp / "train.json").write_text(json.dumps(meta))
            (tmp / COMPLETE).write_text("")
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        self._barrier()
        self.last_save_time = time.monotonic()
        return final

    def _prune(self) -> None:
        """Keep the newest `checkpoint.keep` complete checkpoints; at_steps ones are kept too."""
        ckpts = complete_checkpoints(self.root)
        keep_steps = set(self.cfg.checkpoint.at_steps)
        for old in ckpts[: max(0, len(ckpts) - self.cfg.checkpoint.keep)]:
            if int(old.name.split("-")[1]) not in keep_steps:
                shutil.rmtree(old)

    def finish(self) -> None:
        pass

    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier()


def load_model_weights(model, path: Path) -> None:
    """Load only the model's weights from a checkpoint folder into a single-process model."""
    sd = {"model": model.state_dict()}
    dcp.load(sd, checkpoint_id=str(path))
    model.load_state_dict(sd["model"])
