"""A run folder carries what using the run again needs: its config, its tokenizer, its checkpoints.

    runs/tiny/config.toml                 the resolved config; data.tokenizer names the copy below
    runs/tiny/tokenizer/tokenizer.json    the Hugging Face tokenizer the run reads (when not 'bytes')
    runs/tiny/checkpoints/step-N/         trainer/checkpoint.py

`meshformer generate RUN_DIR` and `meshformer export RUN_DIR OUT` read nothing else, wherever the
folder has moved: no original --config, no overrides, no path into a cache.
"""
from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path

import data as data_pkg
from core.errors import CheckpointError, ConfigError, UsageError
from core.run_config import Config, load_config
from data.tokenizer import tokenizer_from_spec
from trainer.checkpoint_files import complete_checkpoints, is_complete, read_json, step_dir_name

CONFIG_NAME = "config.toml"
TOKENIZER_FILE = Path("tokenizer") / "tokenizer.json"
CHECKPOINTS = "checkpoints"
RUN_DIR_HINT = "the run.dir a `meshformer train` wrote (config.toml, checkpoints/), e.g. runs/tiny"


def read_tokenizer_file(cfg: Config) -> bytes | None:
    """The tokenizers JSON the run reads: data.tokenizer = 'hf:PATH', or the one the manifest of
    pre-tokenized shards names when it is on this machine. None for bytes and tiktoken (nothing to
    copy: the byte tokenizer has no file, a tiktoken encoding is named). Read before the run folder
    is prepared: run.overwrite may move a tokenizer that lives in it aside."""
    spec = data_pkg.build_tokenizer(cfg.data).spec
    return Path(spec[3:]).read_bytes() if spec.startswith("hf:") else None


def carry_tokenizer(cfg: Config, run_dir: Path, content: bytes | None) -> Config:
    """Copy the tokenizer into the run folder and return the config to save there, whose
    data.tokenizer names the copy, so config.toml alone reproduces the run. The copy's path is
    spelled through run.dir, as run.dir itself is (both relative to where the run was started, or
    both absolute). Pre-tokenized shards keep 'pretokenized' (their manifest says which ids they
    hold); generate and export find the copy in the run folder."""
    if content is None:
        return cfg
    dest = run_dir / TOKENIZER_FILE
    if not (dest.is_file() and dest.read_bytes() == content):
        dest.parent.mkdir(exist_ok=True)
        part = dest.with_name(dest.name + ".part")
        part.write_bytes(content)
        os.replace(part, dest)               # never a half-written tokenizer next to a checkpoint
    if cfg.data.tokenizer == "pretokenized":
        return cfg
    return cfg.replace("data", tokenizer=f"hf:{Path(cfg.run.dir) / TOKENIZER_FILE}")


def load_run_config(run_dir: str, overrides: list[str]) -> Config:
    """RUN_DIR/config.toml with run.dir = RUN_DIR and the run folder's own tokenizer copy (so a
    moved or copied folder works), then the user's overrides on top."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"{run_dir!r} is not a folder; give a run folder: {RUN_DIR_HINT}")
    config = path / CONFIG_NAME
    if not config.is_file():
        raise UsageError(f"{run_dir!r} is not a run folder (no {CONFIG_NAME}); give {RUN_DIR_HINT}")
    try:
        saved = tomllib.loads(config.read_text()).get("data", {}).get("tokenizer", "")
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{config}: not valid TOML ({e}); the run folder's config is damaged") from None
    own = ["--run.dir", str(path)]
    if isinstance(saved, str) and saved.startswith("hf:") and (path / TOKENIZER_FILE).is_file():
        own += ["--data.tokenizer", f"hf:{path / TOKENIZER_FILE}"]
    return load_config(config, own + list(overrides))


def run_tokenizer(cfg: Config):
    """The tokenizer that turns text into this run's ids: data.tokenizer's; for pre-tokenized
    shards the copy in the run folder, when the run made one."""
    copy = Path(cfg.run.dir) / TOKENIZER_FILE
    if cfg.data.tokenizer == "pretokenized" and copy.is_file():
        return tokenizer_from_spec(f"hf:{copy}", cfg.data.eot_token)
    return data_pkg.build_tokenizer(cfg.data)


def pick_checkpoint(run_dir: Path, choice: str | None = None) -> Path:
    """The checkpoint to use: the newest complete one of the run, step-N (or N) of the run, or a
    checkpoint folder given by its path."""
    root = Path(run_dir) / CHECKPOINTS
    found = complete_checkpoints(root)
    if choice is None:
        if not found:
            raise CheckpointError(f"run folder {str(run_dir)!r} has no complete checkpoint under {CHECKPOINTS}/; "
                                  "train it first (checkpoint.every, and the last step, save one)")
        return found[-1]
    step = re.fullmatch(r"(?:step-)?(\d+)", choice)
    if step:
        want = root / step_dir_name(int(step.group(1)))
        if want in found:
            return want
        have = ", ".join(p.name for p in found) or "none"
        raise CheckpointError(f"--checkpoint {choice}: no complete checkpoint {want}; this run has: {have}")
    if not is_complete(Path(choice)):
        raise CheckpointError(f"--checkpoint {choice!r} is not a complete checkpoint folder (no COMPLETE marker); "
                              f"give step-N or a folder like {root / step_dir_name(0)}")
    return Path(choice)


def describe(ckpt: Path) -> str:
    """One line naming the checkpoint used, for the user to see which weights answered."""
    step = read_json(ckpt / "train.json", "checkpoint").get("step", "?")
    return f"checkpoint {ckpt} (step {step})"
