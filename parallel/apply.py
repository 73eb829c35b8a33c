"""Apply the parallel layout to the model, in ONE function and a fixed order:

    pipeline split -> tensor/sequence parallel -> expert parallel -> context parallel -> precision conversion (fp8) ->
    activation checkpointing -> torch.compile -> FSDP / HSDP -> materialise + init -> DDP
    (under parallel.engine = deepspeed no FSDP/DDP: deepspeed.initialize shards in make_engine)

Why this order: the split decides which blocks a rank holds; TP turns their weights into DTensors
that fp8 conversion must see (it swaps Linear modules and needs the TP mesh); expert parallel
splits the experts' stacked weights over ep before FSDP shards what remains; checkpointing and
compile wrap whole blocks after their contents are final; data parallel goes last because
`fully_shard` shards whatever parameters (plain or TP DTensors) the blocks end up with. A model
built on the meta device goes through all of it without memory; its parameters are allocated only
after FSDP has sharded them (so at their local size) and before DDP, which needs real tensors to
broadcast (parallel/sharded_init.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from core.parallel_config import ParallelConfig
from core.parallel_plan import ParallelPlan
from core.precision_config import PrecisionConfig
from parallel.activation_checkpoint import apply_activation_checkpointing, apply_compile
from parallel.context import apply_context_parallel
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.deepspeed_config import build_ds_config
from parallel.deepspeed_engine import DeepSpeedEngine
from parallel.dims import ParallelDims
from parallel.expert import apply_expert_parallel
from parallel.dist_engine import DistEngine
from parallel.local_engine import LocalEngine
from parallel.pipeline import PipelineSetup, split_stages
from parallel.pipeline_engine import PipelineEngine
from parallel.precision import convert_for_training
from parallel.sharded_init import ParamInit, init_local_shards, is_meta
from parallel.tensor import apply_tensor_parallel


@dataclass
class Parallelized:
    """What the trainer gets back. `model_parts` holds this rank's modules: one, or one per
    pipeline stage the rank runs. Their parameter names are the unsplit model's (stages keep the
    original layer keys), so a checkpoint that merges the parts' state dicts is layout-independent.
    """
    model_parts: list[nn.Module]
    dims: ParallelDims
    vocab_parallel: bool = False
    pipeline: PipelineSetup | None = None    # when pp > 1
    notes: list[str] = field(default_factory=list)
    pcfg: ParallelConfig | None = None        # engine = deepspeed reads its ZeRO keys from it

    @property
    def model(self) -> nn.Module:
        """The one module when there is one part; else a ModuleList over the parts."""
        return self.model_parts[0] if len(self.model_parts) == 1 else nn.ModuleList(self.model_parts)

    def make_engine(self, optimizer, scheduler, device, precision: PrecisionConfig, grad_clip: float,
                    micro_batch: int = 1, grad_accum: int = 1, local_rank: int = 0):
        common = (optimizer, scheduler, device, precision.dtype, grad_clip, precision.bf16_mode)
        if self.pcfg is not None and self.pcfg.engine == "deepspeed":
            ds_config, diffs = build_ds_config(self.pcfg, micro_batch, grad_accum, self.dims.dp_size,
                                               precision.dtype, grad_clip)
            if diffs:
                self.notes.append(f"{self.pcfg.deepspeed_config} overrides: " + "; ".join(diffs))
            return DeepSpeedEngine(self.model_parts[0], *common, dims=self.dims, ds_config=ds_config,
                                   local_rank=local_rank)
        if self.pipeline is not None:
            return PipelineEngine(self.model_parts, *common, dims=self.dims, vocab_parallel=self.vocab_parallel,
                                  ddp=False, pipeline=self.pipeline,   # the schedule handles DDP's no_sync
                                  seq_shards=self.seq_shards)
        if self.dims.world_size == 1:
            return LocalEngine(self.model_parts[0], *common)
        return DistEngine(self.model_parts, *common, dims=self.dims, vocab_parallel=self.vocab_parallel,
                          ddp=self.dims.ddp_enabled, seq_shards=self.seq_shards)

    @property
    def seq_shards(self) -> int:
        """TP ranks that each hold a slice of a micro-batch's sequence (sequence parallel), else 1."""
        return self.dims.tp if self.dims.tp_enabled and self.pcfg is not None and self.pcfg.sp else 1


def parallelize(model: nn.Module, dims: ParallelDims, plan: ParallelPlan, pcfg: ParallelConfig,
                precision: PrecisionConfig, init: ParamInit | None = None) -> Parallelized:
    """Spread `model` over the mesh. `plan` names the model's modules (filled by the model side);
    the caller has checked the layout against the model and batch (core.layout.validate_layout).
    A model on the meta device needs `init` (the device and the value of each parameter): it is
    materialised after sharding, each rank filling only its own shards. A real model (identical on
    every rank) is used as it is."""
    meta = is_meta(model)
    if meta and init is None:
        raise ValueError("parallelize: the model is on the meta device; pass init=ParamInit(device, value) "
                         "to materialise it")
    device = init.device if meta else next(model.parameters()).device
    pipeline = None
    if dims.pp_enabled:
        pipeline = split_stages(model, plan, dims, pcfg, device)
        parts = pipeline.modules
    else:
        parts = [model]

    vocab_parallel = False
    tp_mesh = dims.tp_mesh if dims.tp_enabled else None
    if dims.tp_enabled:
        # Under expert parallel the routed experts are EP's (replicated over TP there), not TP's.
        tp_plan = dataclasses.replace(plan, moe_experts="") if dims.ep_enabled else plan
        for part in parts:
            vocab_parallel = apply_tensor_parallel(part, tp_mesh, tp_plan, pcfg.sp) or vocab_parallel
    if dims.ep_enabled:
        for part in parts:
            apply_expert_parallel(part, plan, dims, pcfg.sp)
    if dims.cp_enabled:   # attention over the whole sequence from each rank's chunks (ring attention)
        for part in parts:
            apply_context_parallel(part, plan.blocks, plan.attention, plan.attention_core,
                                   dims.cp_mesh.get_group(), pcfg.cp_kv)
    parts = [convert_for_training(part, precision, tp_mesh) or part for part in parts]
    for part in parts:
        apply_activation_checkpointing(part, plan.blocks, pcfg.ac)
        if pcfg.compile:
            apply_compile(part, plan.blocks)
    # Under engine = deepspeed every rank holds the whole model here; deepspeed.initialize shards it.
    wrap_dp = pcfg.engine != "deepspeed"
    if dims.fsdp_enabled and wrap_dp:
        parts = [apply_fsdp(part, plan, dims, pcfg, precision) for part in parts]
    if meta:
        # FSDP's CPU offload keeps the sharded parameters on the host (values still drawn on the device).
        offload = dims.fsdp_enabled and wrap_dp and pcfg.fsdp_cpu_offload
        init_local_shards(parts, init, storage=torch.device("cpu") if offload else None)
    if dims.ddp_enabled and wrap_dp:
        parts = [apply_ddp(part, dims) for part in parts]
    if pipeline is not None:
        pipeline.build_schedule(parts, pcfg)
    return Parallelized(model_parts=parts, dims=dims, vocab_parallel=vocab_parallel, pipeline=pipeline, pcfg=pcfg)
