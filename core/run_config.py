"""The run configuration: one typed section per concern, loaded from TOML plus overrides.

`load_config("configs/tiny.toml", ["--optim.lr", "3e-4"])` returns a validated `Config`.
Each section is a dataclass in its own file here in core/ (model shape in core/model_config.py,
data in core/data_config.py, parallel layout in core/parallel_config.py, ...), so every package can
read the sections it uses without importing another package; this file only gathers them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import tomli_w
import tomllib

from core.data_config import DataConfig
from core.launch_config import LaunchConfig
from core.parallel_config import ParallelConfig, check_deepspeed_run
from core.checkpoint_config import CheckpointConfig
from core.config_parse import ConfigError, apply_overrides, build_section, describe_keys, did_you_mean, section_to_dict
from core.model_config import ModelConfig, known_tokenizer_eot, known_tokenizer_ids, padded_vocab
from core.precision_config import PrecisionConfig
from core.train_config import MetricsConfig, OptimConfig, RunConfig, TrainConfig


SECTIONS: dict[str, type] = {
    "run": RunConfig, "model": ModelConfig, "train": TrainConfig, "optim": OptimConfig,
    "data": DataConfig, "parallel": ParallelConfig, "precision": PrecisionConfig,
    "checkpoint": CheckpointConfig, "metrics": MetricsConfig, "launch": LaunchConfig,
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        for name in SECTIONS:
            section = getattr(self, name)
            if hasattr(section, "validate"):
                try:
                    section.validate()
                except ConfigError:
                    raise
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        if self.parallel.engine == "deepspeed":
            check_deepspeed_run(self)
        elif self.checkpoint.deepspeed_native:
            raise ConfigError(f"checkpoint.deepspeed_native: writes DeepSpeed's own checkpoint, so it needs "
                              f"parallel.engine = deepspeed (got {self.parallel.engine!r}); drop it or switch engine")
        if self.model.vocab_size == 0:     # auto: the byte tokenizer's size is known here; others' when training starts
            ids = known_tokenizer_ids(self.data.tokenizer)
            if ids is not None:
                self.model.vocab_size = padded_vocab(ids)
        if self.model.doc_mask and self.model.eot_id < 0:   # likewise the end-of-text id documents end with
            eot = known_tokenizer_eot(self.data.tokenizer)
            if eot is not None:
                self.model.eot_id = eot
        if self.model.doc_mask and self.parallel.pp > 1:   # a later stage gets hidden states: no tokens to find documents in
            raise ConfigError(f"model.doc_mask: not supported with pipeline parallel yet (parallel.pp = "
                              f"{self.parallel.pp}); set parallel.pp = 1 or model.doc_mask = false")
        if self.train.seq_len > self.model.max_seq_len:
            raise ConfigError(f"train.seq_len: {self.train.seq_len} exceeds model.max_seq_len={self.model.max_seq_len}")
        steps = self.train.steps
        beyond = [s for s in self.checkpoint.at_steps if s > steps]
        if beyond:      # a save that can never happen
            raise ConfigError(f"checkpoint.at_steps: {beyond} lie beyond train.steps={steps}; give steps in 1..{steps}")
        if self.optim.schedule == "wsd" and self.optim.decay_steps > steps:
            raise ConfigError(f"optim.decay_steps: {self.optim.decay_steps} is longer than the run (train.steps={steps}); "
                              f"give at most {steps}, or 0 to use optim.decay_fraction")

    def to_dict(self) -> dict:
        return {name: section_to_dict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def replace(self, section: str, **changes) -> "Config":
        return dataclasses.replace(self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def config_from_tables(tables: dict) -> Config:
    for name in tables:
        if name not in SECTIONS:
            raise ConfigError(f"unknown section [{name}]{did_you_mean(name, SECTIONS)}")
    cfg = Config(**{name: build_section(cls, tables.get(name, {}), name) for name, cls in SECTIONS.items()})
    cfg.validate()
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (None = all defaults), apply `--section.key value` overrides, validate."""
    return config_from_tables(load_tables(path, overrides))


def load_tables(path: str | Path | None, overrides: list[str] | None = None) -> dict:
    """The raw tables of a TOML config with `--section.key value` overrides folded in: the keys the
    user set, before defaults (trainer/cli.py lays an accelerate config beneath them)."""
    tables: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} not found (try configs/tiny.toml)")
        try:
            tables = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {str(p)!r} is not valid TOML: {e}") from None
    apply_overrides(tables, list(overrides or []), SECTIONS)
    return tables


def keys_help() -> str:
    """The `--help` listing of every run config key (type, default, help text)."""
    return describe_keys(SECTIONS)
