"""Where DeepSpeed is the better tool: offload. The planner's layouts keep all training state in
GPU memory (torch FSDP2/DDP/TP/PP); when the model state alone (fp32 weights, gradients, AdamW
moments), even sharded over every GPU, takes much of a GPU, ZeRO-Offload (optimizer state in host
memory) or ZeRO-Infinity (parameters too) lets the run fit where no layout does, at the price of
host<->GPU traffic every step that this planner does not model."""
from __future__ import annotations

from core.model_config import ModelConfig

from .cluster import ClusterProfile
from .layout import Stack

GIB = 1024 ** 3
# Above this share of a GPU taken by the fully sharded model state, activations (which grow with the
# micro-batch and sequence) have little room: offloading the state is what frees the most memory.
STATE_SHARE = 0.5
OVERRIDES = "--parallel.engine deepspeed --parallel.zero_stage 3 --parallel.offload_optimizer cpu"


def offload_hint(cfg: ModelConfig, cluster: ClusterProfile, gpus: int, stack: Stack | None = None) -> str | None:
    """One line recommending DeepSpeed offload when the sharded model state crowds the GPUs, else None."""
    if gpus < 2:      # the DeepSpeed engine needs a process group of 2+ ranks for now
        return None
    stack = stack or Stack()
    n = cfg.num_params()
    weights = n * (stack.master_weights_bytes + stack.model_weights_bytes) / gpus
    grads, optimizer = n * stack.grad_bytes / gpus, n * stack.optimizer_bytes / gpus
    share = (weights + grads + optimizer) / (cluster.gpu_memory_gib * GIB)
    if share < STATE_SHARE:
        return None
    return (f"offload: weights, gradients and AdamW state take {share:.0%} of each GPU even fully sharded over {gpus} "
            f"GPUs; DeepSpeed ZeRO-Offload moves the AdamW state ({optimizer / GIB:.1f} GiB per GPU) to host memory: "
            f"{OVERRIDES} (add --parallel.offload_param cpu to move the weights ({weights / GIB:.1f} GiB) too); "
            "slower per step (host traffic, not modelled here): the tool for too few GPUs, not for speed")
