"""When and how checkpoints are written: the `[checkpoint]` config section."""
from __future__ import annotations

from dataclasses import dataclass, field


def _help(text: str, default, **meta):
    return field(default=default, metadata={"help": text, **meta})


@dataclass
class CheckpointConfig:
    every: int = _help("save every N steps (0 = only at the end)", 0)
    every_minutes: float = _help("also save when this many minutes passed since the last save (0 = off)", 0.0)
    keep: int = _help("complete checkpoints to keep (the newest); never fewer than 1", 3)
    async_save: bool = _help("write in the background while training continues", False, key="async")
    at_steps: list[int] = field(default_factory=list, metadata={"help": "also save at exactly these steps"})
    init_from: str = _help("start a new run from this checkpoint folder (model, optimizer, step)", "")
    final: bool = _help("save when training ends", True)

    def validate(self) -> None:
        if self.every < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every and checkpoint.every_minutes must be >= 0")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1 (the newest complete checkpoint is never deleted), got {self.keep}")
