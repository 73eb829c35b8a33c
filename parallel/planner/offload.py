"""Where DeepSpeed is the better tool: ZeRO-3 with the optimizer (ZeRO-Offload) and optionally the
parameters (ZeRO-Infinity, CPU) in host memory, as meshformer's DeepSpeed engine runs it (data
parallel over all GPUs, no TP/PP, parallel.ac none: the engine refuses the rest for now).

GPU memory per rank: the bf16 parameter partition (none when the parameters are offloaded), no
gradient partition (ZeRO-3 keeps it in host memory under optimizer offload: DeepSpeed stage3.py
puts its fp32 gradient buffers on the offload device), activations and logits as for the torch
layouts (memory.py), and DeepSpeed's working buffers (constants below: DeepSpeed's documented
defaults, which our generated ds_config does not change).

Host memory per node: per rank, the fp32 master partition, AdamW's two fp32 moments and the fp32
gradient accumulation buffer (16 bytes a parameter), + the bf16 partition under parameter
offload (2), + a process baseline; refused above the profile's host.memory_gib.

Step time: the torch timing model of the same ZeRO-3 layout (FSDP over all GPUs, bf16 gradient
reduction) without its GPU optimizer step, plus
- gradients GPU->host every microbatch (bf16 partition, 2 bytes a parameter / g): DeepSpeed copies
  each reduced partition as the backward produces it, so it overlaps the backward; only the excess
  is exposed;
- updated bf16 parameters host->GPU after the optimizer step (without parameter offload): exposed,
  the next forward needs them;
- under parameter offload, the partition host->GPU before each forward and backward all-gather,
  prefetched: the excess over the microbatch's compute is exposed (and no post-step upload);
- the CPU AdamW step, memory-bound on the node's host DRAM shared by its ranks (constants below).
PCIe is taken as `host.pcie_gbps` per GPU per direction, all GPUs of a node transferring at once.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.model_config import ModelConfig

from .cluster import GIB, ClusterProfile
from .layout import Layout, Stack
from .memory import memory_per_gpu, unsharded_params
from .search import divisors
from .timing import step_time

# DeepSpeed ZeRO-3 defaults (deepspeed.ai/docs/config-json, "ZeRO optimizations"): the gradient
# reduce bucket (reduce_bucket_size 5e8 elements) and the parameter prefetch bucket
# (stage3_prefetch_bucket_size 5e7 elements), both bf16 on the GPU.
REDUCE_BUCKET = 500_000_000
PREFETCH_BUCKET = 50_000_000
# Host bytes per parameter of one rank's partition under optimizer offload: fp32 master (4), AdamW
# m and v (8), fp32 gradient accumulation buffer (4).
HOST_STATE_BYTES = 16
HOST_PARAM_BYTES = 2          # the bf16 partition, pinned, under parameter offload
# Resident host memory of one training process besides the model state (torch + CUDA libraries,
# pinned staging, data loader): an estimate (a few GiB per rank is what such processes show).
HOST_PER_RANK_GIB = 4.0
# meshformer's DeepSpeed engine steps our torch AdamW (foreach) on the CPU partition, not DeepSpeed's
# fused CPU Adam (parallel/deepspeed_config.py). Its DRAM traffic per parameter, counted from
# torch's _multi_tensor_adamw: weight decay (r4 w4), m lerp (r8 w4), v mul + addcmul (r4 w4, r8 w4),
# sqrt, bias-correction div, + eps (3 x r4 w4), addcdiv (r12 w4) = 84; gradient clipping (norm r4,
# scale r4 w4) = 12; bf16 copy for the GPU (r4 w2) = 6: about 100 bytes.
CPU_ADAMW_BYTES = 100
# Fraction of the node's peak DRAM bandwidth multi-threaded elementwise CPU code reaches (STREAM
# triad on 2-socket servers reaches ~70-80%; torch's foreach kernels are not better than STREAM).
HOST_DRAM_EFFICIENCY = 0.7
# Offload's point is memory: beside a torch layout that fits it is shown only where the fully
# sharded model state (16 bytes a parameter: fp32 weights, gradients, AdamW m and v) takes at least
# this share of each GPU; below it a small model at a large batch would list offload everywhere
# (its CPU step amortised over the batch), where it buys nothing.
STATE_SHARE = 0.5
BASE = "--parallel.engine deepspeed --parallel.zero_stage 3 --parallel.offload_optimizer cpu"


def state_share(cfg: ModelConfig, cluster: ClusterProfile, gpus: int) -> float:
    """The share of one GPU that fp32 weights, gradients and AdamW state take fully sharded over `gpus`."""
    return 16 * cfg.num_params() / gpus / cluster.memory_bytes


@dataclass(frozen=True)
class OffloadPrediction:
    layout: Layout                 # ZeRO-3 over all GPUs: dp_shard = gpus
    offload_param: bool
    gpu_bytes: int                 # predicted peak per GPU (margin included)
    gpu_capacity: int
    host_bytes: int                # per node
    host_capacity: int
    gpu_step_s: float              # the torch timing model without its GPU optimizer step
    pcie_exposed_s: float
    cpu_adam_s: float
    step: float
    tokens_per_s: float

    @property
    def fits_gpu(self) -> bool:
        return self.gpu_bytes <= self.gpu_capacity

    @property
    def fits_host(self) -> bool:
        return self.host_bytes <= self.host_capacity

    @property
    def fits(self) -> bool:
        return self.fits_gpu and self.fits_host

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "offload_param": self.offload_param, "fits": self.fits,
                "gpu_memory_gib": self.gpu_bytes / GIB, "gpu_capacity_gib": self.gpu_capacity / GIB,
                "host_memory_gib_per_node": self.host_bytes / GIB, "host_capacity_gib": self.host_capacity / GIB,
                "step_s": self.step, "gpu_step_s": self.gpu_step_s, "pcie_exposed_s": self.pcie_exposed_s,
                "cpu_adamw_s": self.cpu_adam_s, "tokens_per_s": self.tokens_per_s,
                "overrides": " ".join(self.overrides())}

    def overrides(self) -> list[str]:
        """The run-config overrides that select this layout (the engine takes ZeRO data parallel only)."""
        lay = self.layout
        return ["--parallel.tp", "1", "--parallel.pp", "1", "--parallel.dp_replicate", "1",
                "--parallel.dp_shard", str(lay.gpus), *BASE.split(),
                *(["--parallel.offload_param", "cpu"] if self.offload_param else []),
                "--train.batch_size", str(lay.micro_batch), "--train.grad_accum", str(lay.microbatches),
                "--parallel.ac", "none", "--precision.dtype", lay.dtype, "--train.seq_len", str(lay.seq_len)]

    def short(self) -> str:
        return (f"deepspeed zero3 dp{self.layout.gpus} mb{self.layout.micro_batch}x{self.layout.microbatches} "
                f"offload=optimizer{'+params' if self.offload_param else ''}")

    def describe(self) -> str:
        s = self.step
        return (f"GPU {self.gpu_bytes / GIB:.1f} of {self.gpu_capacity / GIB:.0f} GiB; host {self.host_bytes / GIB:.0f} "
                f"of {self.host_capacity / GIB:.0f} GiB per node; step {s:.3f} s = GPU work {self.gpu_step_s / s:.0%} "
                f"+ exposed PCIe {self.pcie_exposed_s / s:.0%} + CPU AdamW {self.cpu_adam_s / s:.0%}")


def predict_offload(cfg: ModelConfig, layout: Layout, cluster: ClusterProfile, offload_param: bool) -> OffloadPrediction:
    """Memory and time of ZeRO-3 + CPU offload for `layout` (tp = pp = 1, dp_shard = GPUs, ac none)."""
    g, m = layout.gpus, layout.microbatches
    stack = Stack(grad_bytes=2)                        # DeepSpeed reduces bf16 gradients in a bf16 run
    n = cfg.num_params()
    shard = n / g
    base = memory_per_gpu(cfg, layout, stack, cluster)
    _, unit = unsharded_params(cfg, layout, 0)
    e = 4 if layout.dtype == "fp32" else 2
    params = 0 if offload_param else shard * e
    # reduce bucket + the gathered current and prefetched units + one unit of unsharded gradients
    buffers = e * (min(n, REDUCE_BUCKET) + 2 * unit + min(n, PREFETCH_BUCKET) + unit)
    used = params + base.activations + base.logits + buffers
    gpu = int(used * (1 + cluster.fragmentation) + cluster.activation_slack * (base.activations + base.logits)
              + cluster.reserved_gib * GIB)
    ranks = min(g, cluster.gpus_per_node)
    host = int(ranks * (shard * (HOST_STATE_BYTES + (HOST_PARAM_BYTES if offload_param else 0))
                        + HOST_PER_RANK_GIB * GIB))

    t = step_time(cfg, layout, stack, cluster)
    gpu_step = t.step - t.optimizer
    pcie = cluster.pcie_gbps * 1e9
    bwd_mb = (t.compute - t.recompute) / m * 2 / 3   # backward = 2 of the 3 passes
    exposed = m * max(0.0, shard * e / pcie - bwd_mb)
    if offload_param:                                 # fetched for the forward and the backward, prefetched
        exposed += m * max(0.0, 2 * shard * e / pcie - t.compute / m)
    else:
        exposed += shard * e / pcie
    cpu = ranks * shard * CPU_ADAMW_BYTES / (cluster.host_memory_gbs * 1e9 * HOST_DRAM_EFFICIENCY)
    step = gpu_step + exposed + cpu
    return OffloadPrediction(layout=layout, offload_param=offload_param, gpu_bytes=gpu,
                             gpu_capacity=cluster.memory_bytes, host_bytes=host,
                             host_capacity=int(cluster.host_memory_gib * GIB), gpu_step_s=gpu_step,
                             pcie_exposed_s=exposed, cpu_adam_s=cpu, step=step,
                             tokens_per_s=layout.global_batch * layout.seq_len / step)


@dataclass
class OffloadSearch:
    best: OffloadPrediction | None        # the fastest that fits GPU and host memory
    refused: dict                         # reason -> count

    def why_not(self) -> str:
        return ", ".join(f"{n} {r}" for r, n in self.refused.items()) or "no candidate"


def search_offload(cfg: ModelConfig, cluster: ClusterProfile, gpus: int, global_batch: int, seq_len: int,
                   dtype: str = "bf16", max_micro_batch: int = 64) -> OffloadSearch:
    """The fastest ZeRO-3 + CPU offload layout that fits GPU and host memory (None if none does)."""
    refused = {"needs 2+ GPUs (the DeepSpeed engine)": 0, "does not fit GPU memory": 0,
               "exceeds host memory": 0, "batch not divisible": 0}
    best = None
    if gpus < 2 or global_batch % gpus or dtype == "fp8":
        refused["needs 2+ GPUs (the DeepSpeed engine)" if gpus < 2 else "batch not divisible"] += 1
        return OffloadSearch(None, {k: v for k, v in refused.items() if v})
    per_rank = global_batch // gpus
    # Parameter offload only where optimizer offload alone fits no micro-batch: its per-layer fetches
    # are modelled by bandwidth alone (prefetched, hidden behind compute), which flatters it.
    for op in (False, True):
        for mb in (b for b in divisors(per_rank) if b <= max_micro_batch):
            layout = Layout(dp_shard=gpus, micro_batch=mb, microbatches=per_rank // mb, dtype=dtype, seq_len=seq_len)
            p = predict_offload(cfg, layout, cluster, op)
            if not p.fits_gpu:
                refused["does not fit GPU memory"] += 1
            elif not p.fits_host:
                refused["exceeds host memory"] += 1
            elif best is None or p.tokens_per_s > best.tokens_per_s:
                best = p
        if best is not None:
            break
    return OffloadSearch(best, {k: v for k, v in refused.items() if v})
