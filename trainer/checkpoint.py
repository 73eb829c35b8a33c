"""Checkpoints of the whole training state with torch.distributed.checkpoint (DCP).

What is saved: model and optimizer (DCP shards, each rank writes its own), the LR schedule,
step and tokens (train.json), and per rank the data-loader position and RNG states
(rank-<r>.json). When: every `checkpoint.every` steps, every `checkpoint.every_minutes`,
at `checkpoint.at_steps`, at the end, and on SIGTERM/SIGUSR1 (launch/preemption.py).
How: synchronously, or in the background (`checkpoint.async`, trainer/checkpoint_async.py);
always under a temporary name, renamed when complete (trainer/checkpoint_files.py).
Resume: a run folder with a complete checkpoint continues from the newest one, under any
parallel layout (trainer/checkpoint_state.py). See trainer/CHECKPOINTS.md.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from core.errors import ConfigError
from launch.preemption import EXIT_PREEMPTED, Preemption
from parallel.sharded_init import fill_local_shards
from trainer import checkpoint_files as files
from trainer.checkpoint_async import AsyncCheckpointWriter
from trainer.checkpoint_files import COMPLETE, complete_checkpoints, step_dir_name  # noqa: F401 (public API)
from trainer.checkpoint_state import (CheckpointError, CheckpointWriter, single_process_quiet, ModelParts, as_list, check_against_metadata, dcp_load,
                                      model_config_diff, read_metadata, rng_state, set_rng_state)
from trainer.hf_llama import WeightsReader, find_weights_files
from trainer.run_lock import LOCK_NAME

PREEMPTED_MARKER = "PREEMPTED"
DAMAGED_PREFIX = "damaged-"


def find_damage(path: Path, ctx=None) -> str | None:
    """checkpoint_files.find_damage with the files split over the ranks of `ctx` (every rank gets
    the same answer)."""
    if ctx is None or not ctx.distributed:
        return files.find_damage(path)
    found = [None] * ctx.world_size
    dist.all_gather_object(found, files.find_damage(path, ctx.rank, ctx.world_size))
    return next((p for p in found if p), None)


def live_slurm_logs() -> set[str]:
    """The names this Slurm job's own log may have in the run folder (`slurm-%j.out`, or
    `slurm-%A_%a.out` in an array): run.overwrite leaves them in place, as the job is still writing."""
    env = os.environ
    names = {f"slurm-{env['SLURM_JOB_ID']}.out"} if env.get("SLURM_JOB_ID") else set()
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        names.add(f"slurm-{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}.out")
    return names


class CheckpointManager:
    def __init__(self, cfg, ctx, run_dir: Path, *, model, optimizer, scheduler, loader, state, dims=None,
                 before_save: Callable[[int], None] | None = None, parts=None):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, Path(run_dir)
        self.before_save = before_save      # called with the step first in every save (may raise)
        self.root = self.run_dir / "checkpoints"
        # `parts`: an engine's own view of model and optimizer state (DeepSpeed's ZeRO fragments)
        self.parts = parts if parts is not None else ModelParts(model, optimizer)
        self.schedulers = as_list(scheduler)
        self.loader, self.state = loader, state
        self.dp_rank = dims.dp_rank if dims is not None else ctx.rank
        self.dp_size = dims.dp_size if dims is not None else ctx.world_size
        self.layout = _layout(dims, ctx)
        self.last_save_time = time.monotonic()
        self.last_saved_step = -1
        self.preempted = False
        self.writer = AsyncCheckpointWriter(ctx, self.parts.optimizers) if cfg.checkpoint.async_save else None
        self.preemption = Preemption(ctx, cfg.checkpoint.signal_check_every)

    # ---- run folder -------------------------------------------------------------------------
    def prepare_run_dir(self) -> None:
        """A run folder with a previous run is resumed if it has a checkpoint; otherwise starting
        over it needs run.overwrite, which moves the old files aside (nothing is deleted)."""
        has_run = (self.run_dir / "metrics.jsonl").exists()
        if self.cfg.run.overwrite and (has_run or self.root.exists()):
            if self.ctx.is_main:
                aside = self.run_dir.with_name(f"{self.run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
                aside.mkdir()
                keep = {LOCK_NAME, *live_slurm_logs()}    # the lock this run holds, the log it writes
                for entry in self.run_dir.iterdir():
                    if entry.name not in keep:
                        entry.rename(aside / entry.name)
                print(f"run.overwrite: moved the previous run to {aside}", flush=True)
            self._barrier()
            return
        if has_run and not complete_checkpoints(self.root):
            raise ConfigError(f"run.dir: {str(self.run_dir)!r} already holds a run with no complete checkpoint to "
                              "resume; pick another run.dir or pass --run.overwrite true (the old run is moved aside)")
        if self.ctx.is_main:
            (self.run_dir / PREEMPTED_MARKER).unlink(missing_ok=True)

    # ---- restore ---------------------------------------------------------------------------
    def restore(self) -> bool:
        """Resume from the newest complete checkpoint of this run; else start from
        checkpoint.init_from if set. Returns True when some state was loaded."""
        loaded = self._restore()
        self.preemption.install()
        return loaded

    def _restore(self) -> bool:
        for partial in files.partial_checkpoints(self.root):
            self._say(f"ignoring incomplete checkpoint {partial} (a save that did not finish)")
        ckpts = complete_checkpoints(self.root)
        for ckpt in reversed(ckpts):
            problem = find_damage(ckpt, self.ctx)
            if problem is None:
                self.load(ckpt)
                self._say(f"resumed from {ckpt} at step {self.state.step}")
                return True
            if self.cfg.checkpoint.on_corrupt == "error":
                raise CheckpointError(f"checkpoint {str(ckpt)!r} is damaged: {problem} (checkpoint.on_corrupt = 'error'; "
                                      "'fallback' resumes from the newest checkpoint that verifies)")
            self._set_aside_damaged(ckpt, problem)
        if ckpts:
            raise CheckpointError(f"run.dir: none of the {len(ckpts)} checkpoints of {str(self.run_dir)!r} verifies "
                                  "(renamed damaged-step-*); start over with --run.overwrite true or another run.dir")
        if self.cfg.checkpoint.init_from:
            self.init_from(self.cfg.checkpoint.init_from)
            return True
        return False

    def init_from(self, source: str) -> None:
        """A new run from a checkpoint folder (model, optimizer, step, tokens, LR position, data
        position), a run folder (its newest checkpoint) or safetensors weights (weights only)."""
        path = Path(source)
        if (path / "checkpoints").is_dir() and not (path / ".metadata").exists():
            found = complete_checkpoints(path / "checkpoints")
            if not found:
                raise CheckpointError(f"checkpoint.init_from: run folder {source!r} has no complete checkpoint")
            path = found[-1]
        weights = find_weights_files(path)
        if weights:
            # One full tensor at a time, each rank keeping its shard: no rank holds the whole file.
            reader = WeightsReader(weights, self.cfg.model)
            fill = getattr(self.parts, "fill_weights", None)     # an engine's own (DeepSpeed's ZeRO fragments)
            fill(reader.value) if fill is not None else fill_local_shards(self.parts.parts, reader.value)
            self._say(f"initialised weights from {source} (fresh optimizer, step 0)")
            return
        _require_complete(path)
        problem = find_damage(path, self.ctx)
        if problem:
            raise CheckpointError(f"checkpoint.init_from: {str(path)!r} is damaged: {problem}")
        self.load(path)
        self._say(f"initialised from {path} at step {self.state.step} (checkpoint.init_from)")

    def load(self, path: Path, *, with_optim: bool = True, with_loader: bool = True) -> None:
        path = Path(path)
        _require_complete(path)
        meta = files.read_json(path / "train.json", "checkpoint")
        diffs = model_config_diff(meta.get("model", {}), _asdict(self.cfg.model))
        if diffs:
            raise CheckpointError(f"checkpoint {str(path)!r} was saved with another model config:\n  "
                                  + "\n  ".join(diffs))
        check_against_metadata(path, read_metadata(path), self.cfg.model, with_optim)
        sd = self.parts.state_dict(with_optim=with_optim)
        dcp_load(sd, path)
        self.parts.load_state_dict(sd)
        self.state.step, self.state.tokens = meta["step"], meta["tokens"]
        for i, sched in enumerate(self.schedulers):       # a run's optimizers share one schedule
            _load_scheduler(sched, meta["schedulers"][min(i, len(meta["schedulers"]) - 1)])
        self._load_rank_state(path, meta, with_loader)
        self.last_saved_step = self.state.step

    def newest(self) -> Path | None:
        """The newest complete checkpoint, once a save in flight is committed (collective)."""
        if self.writer is not None:
            self.writer.wait()
        self._barrier()
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def roll_back(self) -> Path | None:
        """Reload the newest complete checkpoint that verifies (model, optimizer, LR schedule,
        step, tokens, RNG) but leave the data loader where it is, so the batches read since that
        checkpoint are skipped (train.on_nonfinite = rollback). None when there is none."""
        newest = self.newest()
        for path in reversed(complete_checkpoints(self.root) if newest else []):
            if find_damage(path, self.ctx) is None:
                self.load(path, with_loader=False)
                return path
        return None

    def _load_rank_state(self, path: Path, meta: dict, with_loader: bool = True) -> None:
        ranks = [files.read_json(path / f"rank-{r}.json", "checkpoint") for r in range(meta["world_size"])]
        if with_loader and hasattr(self.loader, "load_state_dict"):
            try:
                self.loader.load_state_dict(_loader_state_for(ranks, self.dp_rank, self.dp_size, path))
            except (ValueError, KeyError) as e:
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"checkpoint {str(path)!r}: the data position does not fit this run's "
                                      f"data loader: {e}") from None
        if meta.get("layout") == self.layout:
            set_rng_state(ranks[self.ctx.rank]["rng"], self.ctx.device)
        else:
            self._say(f"layout changed ({meta.get('layout')} -> {self.layout}): RNG states are not restored "
                      "(the model uses no randomness in training; data order comes from the loader state)")

    def _set_aside_damaged(self, ckpt: Path, problem: str) -> None:
        """Rename a damaged checkpoint out of the way (kept for inspection, never pruned)."""
        aside = ckpt.with_name(f"{DAMAGED_PREFIX}{ckpt.name}")
        self._say(f"checkpoint {ckpt.name} is damaged: {problem}; renamed it {aside.name} and trying the one before")
        self._barrier()
        if self.ctx.is_main:
            ckpt.rename(aside)
        self._barrier()

    # ---- save ------------------------------------------------------------------------------
    def after_step(self, final: bool = False) -> None:
        c, step = self.cfg.checkpoint, self.state.step
        if self.writer is not None:
            self.writer.poll()
        time_due = bool(c.every_minutes) and time.monotonic() - self.last_save_time >= 60 * c.every_minutes
        stop, time_due = self.preemption.vote(step, time_due)
        if stop and not final:
            self.save(blocking=True)
            self.preempted = True
            if self.ctx.is_main:
                files.write_json(self.run_dir / PREEMPTED_MARKER, {
                    "step": step, "signal": self.preemption.signal_name, "exit_code": EXIT_PREEMPTED,
                    "checkpoint": str(self.root / step_dir_name(step))})
            why = ("; run the same command to resume" if self.preemption.signal_name == "SIGINT"   # Ctrl-C
                   else " so the launcher can requeue the job")
            self._say(f"{self.preemption.signal_name}: saved step {step}; exiting with code {EXIT_PREEMPTED}{why}")
            return
        due = (final and c.final) or (c.every and step % c.every == 0) or step in c.at_steps or time_due
        if due:
            self.save()

    def save(self, blocking: bool = False) -> Path:
        step = self.state.step
        if self.before_save is not None:
            self.before_save(step)
        name = step_dir_name(step)
        final, tmp = self.root / name, self.root / f"{files.TMP_PREFIX}{name}"
        if self.writer is not None:
            self.writer.wait()                  # commits the previous background save
        if step == self.last_saved_step and (final / COMPLETE).exists():
            return final
        if self.ctx.is_main:
            files.remove_partials(self.root)
            tmp.mkdir(parents=True)
        self._barrier()
        sd = self.parts.state_dict()
        if self.cfg.checkpoint.deepspeed_native:   # validated: only under parallel.engine = deepspeed
            self.parts.save_native(tmp / "deepspeed", f"global_step{step}")
        loader_state = self.loader.state_dict() if hasattr(self.loader, "state_dict") else None
        records = {tmp / f"rank-{self.ctx.rank}.json": json.dumps({      # serialized now: a snapshot
            "rank": self.ctx.rank, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
            "loader": loader_state, "rng": rng_state(self.ctx.device)})}
        if self.ctx.is_main:
            records[tmp / "train.json"] = json.dumps(self._train_meta())

        def write_records():        # before this rank's DCP write, so before rank 0 can commit
            for path, text in records.items():
                files.write_text(path, text)

        self.last_saved_step, self.last_save_time = step, time.monotonic()
        if self.writer is not None and not blocking:
            self.writer.start(sd, tmp, before_write=write_records, records=list(records),
                              on_done=lambda: self._commit(tmp, final))
            return final
        write_records()
        with single_process_quiet():
            dcp.save(sd, storage_writer=CheckpointWriter(str(tmp), rank=self.ctx.rank,
                                                         world_size=self.ctx.world_size, records=list(records)))
        self._commit(tmp, final)
        self._barrier()
        return final

    def _train_meta(self) -> dict:
        from dataclasses import asdict
        return {"step": self.state.step, "tokens": self.state.tokens,
                "schedulers": [s.state_dict() for s in self.schedulers],
                "world_size": self.ctx.world_size, "layout": self.layout,
                "model": asdict(self.cfg.model), "config_toml": self.cfg.to_toml(), "format": 2}

    def _commit(self, tmp: Path, final: Path) -> None:
        if not self.ctx.is_main:
            return
        files.commit(tmp, final)
        files.prune(self.root, self.cfg.checkpoint.keep, self.cfg.checkpoint.at_steps)

    def finish(self) -> None:
        """Wait for a background save and commit it; give the signal handlers back."""
        if self.writer is not None:
            self.writer.close()
        self.preemption.close()
        self._barrier()

    # ---- helpers ---------------------------------------------------------------------------
    def _barrier(self) -> None:
        if self.ctx.distributed:
            dist.barrier()

    def _say(self, text: str) -> None:
        if self.ctx.is_main:
            print(text, flush=True)


def _layout(dims, ctx) -> dict:
    if dims is None:
        return {"world_size": ctx.world_size}
    return {"world_size": ctx.world_size, **{k: getattr(dims, k) for k in ("pp", "dp_replicate", "dp_shard", "tp")}}


def _asdict(section) -> dict:
    from dataclasses import asdict
    return asdict(section)


def _require_complete(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {str(path)!r} is not a folder (a DCP checkpoint is a folder; "
                              "safetensors files go through checkpoint.init_from)")
    if not (path / COMPLETE).is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is incomplete (no {COMPLETE} marker): its save did not "
                              f"finish; use an earlier one: {[p.name for p in complete_checkpoints(path.parent)]}")


def _load_scheduler(sched, saved: dict) -> None:
    """Restore the schedule's position, then recompute the LR from *this* run's schedule (a
    branch with more train.steps continues WSD's constant phase instead of the old decay).
    Only the position is taken from the checkpoint: every optimizer of a run follows the same
    schedule, and pipeline stages may hold a different number of parameter groups per optimizer."""
    lambdas = getattr(sched, "lr_lambdas", None)
    if not lambdas:
        sched.load_state_dict(saved)
        return
    sched.last_epoch = saved["last_epoch"]
    sched._step_count = saved.get("_step_count", saved["last_epoch"] + 1)
    lrs = [base * f(sched.last_epoch) for base, f in zip(sched.base_lrs, lambdas)]
    for group, lr in zip(sched.optimizer.param_groups, lrs):
        group["lr"] = lr
    sched._last_lr = lrs


def _loader_state_for(ranks: list[dict], dp_rank: int, dp_size: int, path: Path):
    """The data position for this DP rank. The data package's loader state is the same on every
    DP rank and survives a DP-size change, so when all saved states agree any one serves; else
    the same DP coordinate under the same DP size; else the loader must merge them itself."""
    states = [r.get("loader") for r in ranks]
    if all(json.dumps(s, sort_keys=True) == json.dumps(states[0], sort_keys=True) for s in states):
        return states[0]
    saved_dp = ranks[0].get("dp_size")
    if saved_dp == dp_size:
        return next(r["loader"] for r in ranks if r.get("dp_rank") == dp_rank)
    raise CheckpointError(f"checkpoint {str(path)!r}: the data loader's per-rank positions differ and the "
                          f"data-parallel size changed ({saved_dp} -> {dp_size}); this loader cannot be resumed "
                          "under another DP size")


def load_model_weights(model, path: Path) -> None:
    """Load only the model's weights from a complete checkpoint folder into a single-process
    model (generation, export); checks keys and shapes first."""
    path = Path(path)
    _require_complete(path)
    problem = find_damage(path)
    if problem:
        raise CheckpointError(f"checkpoint {str(path)!r} is damaged: {problem}")
    check_against_metadata(path, read_metadata(path), model.cfg, with_optim=False)
    sd = {"model": model.state_dict()}
    dcp_load(sd, path)
    model.load_state_dict(sd["model"])
