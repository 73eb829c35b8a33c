"""The parallel layout: the `[parallel]` config section (sizes of each mesh dimension and how
each wrapper behaves)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option


@dataclass
class ParallelConfig:
    dp_replicate: int = option("data-parallel replicas (DDP, or the replicate dim of HSDP)", 1)
    dp_shard: int = option("FSDP shard group size; -1 = whatever the world size leaves", -1)
    tp: int = option("tensor-parallel degree (keep it within a node)", 1)
    pp: int = option("pipeline stages", 1)
    cp: int = option("context-parallel degree (reserved; must be 1 for now)", 1)
    ep: int = option("expert-parallel degree (reserved; must be 1 for now)", 1)
    sp: bool = option("sequence parallel on norms/dropout when tp > 1", True)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = option("pipeline schedule", "1f1b")
    pp_microbatches: int = option("microbatches per step under pipeline parallel (0 = pp x pp_virtual_stages)", 0)
    pp_virtual_stages: int = option("stages per rank for interleaved schedules", 1)
    pp_layers: list[int] = option("layers per stage for uneven splits (empty = even)", factory=list)
    ac: Literal["none", "full", "selective"] = option("activation checkpointing", "none")
    compile: bool = option("torch.compile each Transformer block", False)
    fsdp_reshard_after_forward: bool = option("FSDP: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2-like)", True)
    fsdp_cpu_offload: bool = option("FSDP: keep sharded parameters and optimizer state on the CPU", False)

    def validate(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "cp", "ep", "pp_virtual_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel.dp_shard: must be >= 1 or -1 (fill), got {self.dp_shard}")
        if self.pp_microbatches < 0:
            raise ValueError(f"parallel.pp_microbatches: must be >= 0 (0 = pp x pp_virtual_stages), got {self.pp_microbatches}")
        if any(n < 1 for n in self.pp_layers):
            raise ValueError(f"parallel.pp_layers: every stage needs >= 1 layer, got {self.pp_layers}")
        if self.cp != 1 or self.ep != 1:
            raise ValueError("parallel.cp and parallel.ep: context and expert parallel are not built yet; use 1")
