"""Data parallel wrappers: DDP, FSDP2 (`fully_shard`), and HSDP (replicate x shard) on the mesh."""
from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from parallel.dims import ParallelDims
from parallel.expert import expert_modules
from parallel.precision import fsdp_mixed_precision


def mixed_precision(precision_cfg) -> MixedPrecisionPolicy:
    """The precision module decides (bf16 or fp8 with bf16_mode=params: bf16 compute, fp32 master
    weights and reductions); otherwise compute in the parameters' own dtype."""
    return fsdp_mixed_precision(precision_cfg) or MixedPrecisionPolicy()


def apply_fsdp(model: nn.Module, plan, dims: ParallelDims, parallel_cfg, precision_cfg) -> nn.Module:
    """`fully_shard` each Transformer block, then the root (embeddings, norm, head), so a block's
    parameters are gathered just before it runs. A 2-D mesh (dp_replicate, dp_shard) gives HSDP.
    Under expert parallel the experts come first, on their own mesh (see shard_experts)."""
    blocks = plan.blocks
    kwargs = dict(mesh=dims.fsdp_mesh, mp_policy=mixed_precision(precision_cfg))
    if parallel_cfg.fsdp_cpu_offload:
        # pin_memory needs an accelerator (parallel/README.md, Platform notes); pinned memory only pays with one.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    reshard = parallel_cfg.fsdp_reshard_after_forward
    if dims.ep_enabled:
        shard_experts(model, plan, dims, reshard, kwargs)
    modules = list(getattr(model, blocks).values())
    for i, block in enumerate(modules):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard and i < len(modules) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard, **kwargs)
    return model


def shard_experts(model: nn.Module, plan, dims: ParallelDims, reshard: bool, kwargs: dict) -> None:
    """The EP-split experts (Shard(0) DTensors over ep) are FSDP-sharded over what dp_shard leaves
    (edp_shard, a mesh of one rank when ep = dp_shard), before their block, whose fully_shard then
    leaves them alone. FSDP averages their gradients over that smaller group; the missing 1 / ep
    is applied where the all-to-all brings the ep ranks' tokens in (parallel/expert.py)."""
    for experts in expert_modules(model, plan):
        fully_shard(experts, reshard_after_forward=reshard, **dict(kwargs, mesh=dims.expert_fsdp_mesh))


def apply_ddp(model: nn.Module, dims: ParallelDims) -> nn.Module:
    """Plain replication: gradients all-reduced (averaged) over the data-parallel group."""
    return DistributedDataParallel(model, process_group=dims.dp_mesh.get_group(),
                                   device_ids=[model_device(model)] if torch.cuda.is_available() else None)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
