"""Placeholder data section until the streamed-data branch lands (it replaces this file)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DataConfig:
    urls: list[str] = field(default_factory=lambda: ["builtin:stdlib"], metadata={"help": "shard URLs"})
    tokenizer: str = field(default="bytes", metadata={"help": "tokenizer"})

    def validate(self) -> None:
        if not self.urls:
            raise ValueError("data.urls: empty source list")
