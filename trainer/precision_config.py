"""Numeric precision of training: the `[precision]` config section."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp8"] = field(default="fp32", metadata={"help": "compute precision; fp32 is the CPU default"})
    bf16_mode: Literal["autocast", "params"] = field(default="autocast", metadata={"help": "bf16 by autocast over fp32 weights, or bf16 parameters with fp32 master weights (FSDP mixed precision)"})

    def validate(self) -> None:
        pass
