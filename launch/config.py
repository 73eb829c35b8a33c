"""How processes find each other: the `[launch]` config section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class LaunchConfig:
    backend: Literal["auto", "gloo", "nccl"] = field(default="auto", metadata={"help": "process-group backend; auto = nccl on CUDA, gloo on CPU"})
    timeout_s: int = field(default=300, metadata={"help": "seconds before a collective or the rendezvous gives up with an error"})

    def validate(self) -> None:
        if self.timeout_s < 1:
            raise ValueError(f"launch.timeout_s: must be >= 1 second, got {self.timeout_s}")
