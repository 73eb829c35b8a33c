"""Apply the parallel layout to the model, in ONE function and a fixed order:

    pipeline split -> tensor/sequence parallel -> precision conversion (fp8) ->
    activation checkpointing -> torch.compile -> FSDP / HSDP / DDP

Why this order: the split decides which blocks a rank holds; TP turns their weights into DTensors
that fp8 conversion must see (it swaps Linear modules and needs the TP mesh); checkpointing and
compile wrap whole blocks after their contents are final; data parallel goes last because
`fully_shard` shards whatever parameters (plain or TP DTensors) the blocks end up with.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field

from torch import nn

from parallel.checkpointing import apply_activation_checkpointing, apply_compile
from parallel.data_parallel import apply_ddp, apply_fsdp
from parallel.dims import ParallelDims
from parallel.mesh import validate_layout


@dataclass
class Parallelized:
    """What the trainer gets back. `model_parts` holds this rank's modules: one, or one per
    pipeline stage the rank runs. Their parameter names are the unsplit model's (stages keep the
    original layer keys), so a checkpoint that merges the parts' state dicts is layout-independent.
    """
    model_parts: list[nn.Module]
    dims: ParallelDims
    vocab_parallel: bool = False
    pipeline: object = None          # parallel.pipeline.PipelineSetup when pp > 1
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> nn.Module:
        """The one module when there is one part; else a ModuleList over the parts."""
        return self.model_parts[0] if len(self.model_parts) == 1 else nn.ModuleList(self.model_parts)

    def make_engine(self, optimizer, scheduler, device, cfg):
        from parallel.engine import DistEngine
        from trainer.engine import LocalEngine
        common = (optimizer, scheduler, device, cfg.precision.dtype, cfg.optim.grad_clip, cfg.precision.bf16_mode)
        if self.pipeline is not None:
            from parallel.pipeline import PipelineEngine
            return PipelineEngine(self.model_parts, *common, dims=self.dims, vocab_parallel=self.vocab_parallel,
                                  ddp=False, pipeline=self.pipeline)   # the schedule handles DDP's no_sync
        if self.dims.world_size == 1:
            return LocalEngine(self.model_parts[0], *common)
        return DistEngine(self.model_parts, *common, dims=self.dims, vocab_parallel=self.vocab_parallel,
                          ddp=self.dims.ddp_enabled)


def convert_precision(model: nn.Module, cfg, tp_mesh) -> nn.Module:
    """Hook for fp8 training: trainer.precision.convert_for_training(model, cfg.precision, tp_mesh)
    when that module exists (issue 8); without it, the model is unchanged."""
    if importlib.util.find_spec("trainer.precision") is None:
        return model
    precision = importlib.import_module("trainer.precision")   # its own import errors surface
    convert = getattr(precision, "convert_for_training", None)
    if convert is None:
        return model
    return convert(model, cfg.precision, tp_mesh) or model


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> Parallelized:
    """Spread `model` (built on CPU from the seed, identical on every rank) over the mesh."""
    pcfg = cfg.parallel
    validate_layout(pcfg, cfg.model, cfg.train.batch_size, cfg.train.seq_len)
    device = next(model.parameters()).device
    pipeline = None
    if dims.pp_enabled:
        from parallel.pipeline import split_stages
        pipeline = split_stages(model, dims, pcfg, device)
        parts = pipeline.modules
    else:
        parts = [model]

    vocab_parallel = False
    tp_mesh = dims.tp_mesh if dims.tp_enabled else None
    if dims.tp_enabled:
        from parallel.tensor import apply_tensor_parallel
        for part in parts:
            vocab_parallel = apply_tensor_parallel(part, tp_mesh, cfg.model, pcfg.sp,
                                                   last_stage=part.output is not None) or vocab_parallel
    parts = [convert_precision(part, cfg, tp_mesh) for part in parts]
    for part in parts:
        apply_activation_checkpointing(part, pcfg.ac)
        if pcfg.compile:
            apply_compile(part)
    if dims.fsdp_enabled:
        parts = [apply_fsdp(part, dims, pcfg, cfg.precision) for part in parts]
    elif dims.ddp_enabled:
        parts = [apply_ddp(part, dims) for part in parts]
    if pipeline is not None:
        pipeline.build_schedule(parts, cfg)
    return Parallelized(model_parts=parts, dims=dims, vocab_parallel=vocab_parallel, pipeline=pipeline)
