"""The parallel layout: the `[parallel]` config section (sizes of each mesh dimension and how
each wrapper behaves)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option
from core.errors import ConfigError


@dataclass
class ParallelConfig:
    dp_replicate: int = option("data-parallel replicas (DDP, or the replicate dim of HSDP)", 1)
    dp_shard: int = option("FSDP shard group size; -1 = whatever the world size leaves", -1)
    tp: int = option("tensor-parallel degree (keep it within a node)", 1)
    pp: int = option("pipeline stages", 1)
    cp: int = option("context-parallel degree: each sequence split into 2*cp chunks, rank r of the ring holds chunks r and "
                      "2cp-1-r (ring attention, parallel/context.py)", 1)
    cp_kv: Literal["ring", "allgather"] = option(
        "context parallel: pass K/V blocks around the ring (memory ~1/cp) or all-gather them (fewer, larger messages)", "ring")
    ep: int = option("expert-parallel degree: MoE experts split over this many ranks, carved out of dp_shard "
                     "(must divide dp_shard and model.moe_experts)", 1)
    sp: bool = option("sequence parallel on norms/dropout when tp > 1", True)
    pp_schedule: Literal["gpipe", "1f1b", "interleaved_1f1b", "zero_bubble"] = option("pipeline schedule", "1f1b")
    pp_microbatches: int = option("microbatches per step under pipeline parallel (0 = pp x pp_virtual_stages)", 0)
    pp_virtual_stages: int = option("stages per rank for interleaved schedules", 1)
    pp_layers: list[int] = option("layers per stage for uneven splits (empty = even)", factory=list)
    ac: Literal["none", "full", "selective"] = option("activation checkpointing", "none")
    compile: bool = option("torch.compile each Transformer block", False)
    fsdp_reshard_after_forward: bool = option("FSDP: free gathered parameters after forward (ZeRO-3) or keep them (ZeRO-2-like)", True)
    fsdp_cpu_offload: bool = option("FSDP: keep sharded parameters and optimizer state on the CPU", False)
    engine: Literal["torch", "deepspeed"] = option(
        "who runs forward/backward/step: torch (FSDP/DDP/TP/PP above) or deepspeed (ZeRO; pip install "
        "'meshformer[deepspeed]')", "torch")
    zero_stage: int = option("engine = deepspeed: ZeRO stage (0 = plain data parallel, 1 optimizer state, "
                             "2 + gradients, 3 + parameters sharded)", 2)
    offload_optimizer: Literal["none", "cpu", "nvme"] = option(
        "engine = deepspeed: where ZeRO keeps the optimizer state (ZeRO-Offload; nvme needs libaio)", "none")
    offload_param: Literal["none", "cpu", "nvme"] = option(
        "engine = deepspeed, zero_stage 3: where ZeRO keeps the parameters (ZeRO-Infinity; nvme needs libaio)", "none")
    nvme_path: str = option("engine = deepspeed: folder for NVMe offload (a fast local disk)", "")
    deepspeed_config: str = option("engine = deepspeed: a user's ds_config.json; its keys win over the ones "
                                   "generated from this config, and each difference is named", "")

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
        if self.engine == "deepspeed":
            self._validate_deepspeed()
        if self.cp > 1 and self.engine == "deepspeed":
            raise ValueError("parallel.cp: context parallel runs under parallel.engine = torch only; set parallel.cp = 1")

    def _validate_deepspeed(self) -> None:
        if self.tp != 1 or self.pp != 1 or self.dp_replicate != 1:
            raise ValueError("parallel.engine = deepspeed: ZeRO data parallel over all ranks only for now; "
                             "set parallel.tp, parallel.pp and parallel.dp_replicate to 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.offload_param != "none" and self.zero_stage != 3:
            raise ValueError(f"parallel.offload_param: {self.offload_param!r} needs parallel.zero_stage = 3 "
                             f"(got {self.zero_stage})")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise ValueError("parallel.offload_optimizer: needs parallel.zero_stage 1, 2 or 3 (got 0)")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            raise ValueError("parallel.nvme_path: NVMe offload needs a folder on a fast local disk")
        for name in ("compile", "fsdp_cpu_offload"):
            if getattr(self, name):
                raise ValueError(f"parallel.{name}: not supported with parallel.engine = deepspeed; set it false")
        if self.ac != "none":
            raise ValueError(f"parallel.ac: {self.ac!r} is not supported with parallel.engine = deepspeed yet; use none")


def check_deepspeed_run(cfg) -> None:
    """What the DeepSpeed engine does not do yet, named before any work (`cfg` is a run Config)."""
    ck = cfg.checkpoint
    if ck.async_save:
        raise ConfigError("checkpoint.async: not built yet for parallel.engine = deepspeed; use false")
    if cfg.train.on_nonfinite != "stop":
        raise ConfigError(f"train.on_nonfinite: {cfg.train.on_nonfinite!r} is not supported with parallel.engine = "
                          "deepspeed yet; use stop")
    if cfg.precision.dtype == "fp8":
        raise ConfigError("precision.dtype: fp8 is not supported with parallel.engine = deepspeed; use fp32 or bf16")
