"""When and how checkpoints are written: the `[checkpoint]` config section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option


@dataclass
class CheckpointConfig:
    every: int = option("save every N steps (0 = only at the end)", 0)
    every_minutes: float = option("also save when this many minutes passed since the last save (0 = off)", 0.0)
    keep: int = option("complete checkpoints to keep (the newest); never fewer than 1", 3)
    async_save: bool = option("write in the background while training continues", False, key="async")
    at_steps: list[int] = option("also save at exactly these steps", factory=list)
    init_from: str = option("start a new run from a checkpoint folder (model, optimizer, step, LR and data "
                           "position) or a run folder (its newest checkpoint); a .safetensors file or an "
                           "export folder loads only the weights", "")
    final: bool = option("save when training ends", True)
    on_corrupt: Literal["fallback", "error"] = option(
        "when a checkpoint fails its checksums on resume: 'fallback' resumes from the newest one that verifies "
        "(the damaged one is renamed damaged-step-N, nothing is deleted); 'error' stops", "fallback")
    deepspeed_native: bool = option("parallel.engine = deepspeed only: also write DeepSpeed's own checkpoint "
                                    "(engine.save_checkpoint: deepspeed/global_stepN/, same world size to load) "
                                    "into each checkpoint folder, for a DeepSpeed script's load_checkpoint", False)
    signal_check_every: int = option("agree across ranks on a termination signal (and on every_minutes saves) "
                                    "every N steps: one tiny all_reduce", 1)

    def validate(self) -> None:
        if self.every < 0 or self.every_minutes < 0:
            raise ValueError("checkpoint.every and checkpoint.every_minutes must be >= 0")
        if self.keep < 1:
            raise ValueError(f"checkpoint.keep: must be >= 1 (the newest complete checkpoint is never deleted), got {self.keep}")
        if self.signal_check_every < 1:
            raise ValueError(f"checkpoint.signal_check_every: must be >= 1, got {self.signal_check_every}")
        if any(s < 1 for s in self.at_steps):
            raise ValueError(f"checkpoint.at_steps: steps must be >= 1, got {self.at_steps}")
