"""`parallel.engine = "deepspeed"`: DeepSpeed's engine runs forward/backward/step (ZeRO stage
0-3, optimizer and parameter offload) on the unchanged model, behind the same interface as the
other engines, so data, metrics, LR schedule and CLI stay ours.

The loss is normalised as everywhere (parallel/local_engine.py): each micro-batch's summed token
loss is divided by the global batch's labelled tokens / dp_size, and `backward(...,
scale_wrt_gas=False)` stops DeepSpeed dividing once more by the accumulation steps; DeepSpeed's
data-parallel gradient average (over dp_size ranks) then gives the global mean. The optimizer is
our torch AdamW handed to DeepSpeed as a client optimizer (DeepSpeed's fused and CPU Adam are
compiled ops, not built by `DS_BUILD_OPS=0`); ZeRO keeps AdamW's param_group dicts, so our LR
schedule (stepped here, not by DeepSpeed) sets the learning rate it uses.

DeepSpeed is imported when the engine is built: it is an optional extra, and importing it probes
the machine's accelerators and compilers (seconds)."""
from __future__ import annotations

import importlib
import os

import torch
import torch.distributed as dist

from core.errors import ConfigError
from parallel.dims import ParallelDims
from parallel.dist_engine import DistEngine
from parallel.deepspeed_state import DeepSpeedParts
from parallel.local_engine import StepOutput, aux_loss, aux_weight, labelled_on_host, token_loss_sum


def import_deepspeed():
    try:
        return importlib.import_module("deepspeed")
    except ImportError as e:
        raise ConfigError(f"parallel.engine = deepspeed: the deepspeed package is not importable ({e}); "
                          "pip install 'meshformer[deepspeed]' (DS_BUILD_OPS=0 on a machine without CUDA)") from None


def check_nvme(ds_config: dict, deepspeed) -> None:
    """NVMe offload reads and writes through DeepSpeed's async I/O op, which needs libaio."""
    zero = ds_config.get("zero_optimization", {})
    wants = [k for k in ("offload_optimizer", "offload_param") if zero.get(k, {}).get("device") == "nvme"]
    if not wants:
        return
    if not deepspeed.ops.op_builder.AsyncIOBuilder().is_compatible(verbose=False):
        raise ConfigError(f"parallel.{wants[0]}: nvme offload needs libaio (apt-get install libaio-dev, then "
                          "reinstall deepspeed); use cpu offload on this machine")


class DeepSpeedEngine(DistEngine):
    """DistEngine whose step is DeepSpeed's: `self.model` is the DeepSpeed engine (its forward
    gathers ZeRO-3 shards), `self.modules` the wrapped model."""

    def __init__(self, model, optimizer, scheduler, device, precision="fp32", grad_clip=0.0,
                 bf16_mode="autocast", *, dims: ParallelDims, ds_config: dict, local_rank: int = 0):
        if dims.world_size < 2 or not dist.is_initialized():
            raise ConfigError("parallel.engine = deepspeed: needs a process group of 2 or more ranks for now; "
                              "launch with torchrun/srun/mpiexec and 2+ processes")
        deepspeed = import_deepspeed()
        # DeepSpeed's engine asserts LOCAL_RANK is in the environment; torchrun sets it, mpiexec and
        # srun do not (launch/ found the local rank another way): DeepSpeed's documented contract.
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        check_nvme(ds_config, deepspeed)
        ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                      dist_init_required=False)
        super().__init__([ds], ds_optimizer, scheduler, device, precision, grad_clip, bf16_mode, dims=dims)
        self.ds, self.wrapped = ds, model
        self.model_parts = [model]      # what eval mode, checks and hooks look at: the wrapped model
        self.ds_config = ds_config
        # checkpoints in our DCP format (parallel/deepspeed_state.py), used by trainer/checkpoint.py
        self.checkpoint_parts = DeepSpeedParts(ds, model, deepspeed)

    def autocast(self):
        """No autocast: under bf16 DeepSpeed holds the weights in bf16 itself (fp32 master copy)."""
        return torch.autocast(self.device.type, enabled=False)

    def train_step(self, batches, skip_nonfinite: bool = False) -> StepOutput:
        """DeepSpeed's micro-steps over `batches`; its `step()` at the last one clips (gradient_clipping)
        and updates. A global batch without a labelled token makes no update (known before the
        forward: one read of the all-reduced count, only on a rank whose own rows hold no label)."""
        labelled_here = labelled_on_host(batches)
        batches = self.to_device(batches)
        count = self.global_labelled_tokens(batches)
        if not labelled_here and not bool(count):
            self.after_step()
            self.scheduler.step()
            zero = torch.zeros((), device=self.device)
            return StepOutput(zero, zero, False, True)
        divisor = count.clamp(min=1).to(torch.float32) / self.dp_size
        total = torch.zeros((), device=self.device)
        for inputs, labels in batches:
            loss = token_loss_sum(self.ds(inputs), labels) / divisor
            aux = aux_loss(self.wrapped)      # MoE balancing, weighted as in LocalEngine.forward_backward
            self.ds.backward(loss if aux is None else loss + aux * aux_weight(labels, divisor), scale_wrt_gas=False)
            self.ds.step()             # an update only at the accumulation boundary
            total += loss.detach()
        norm = self.ds.get_global_grad_norm()
        norm = torch.as_tensor(norm if norm is not None else float("nan"), dtype=torch.float32, device=self.device)
        self.after_step()        # MoE: expert loads summed over data parallel, bias update
        self.scheduler.step()
        return StepOutput(total, norm)
