"""Start-up memory check: before the model is allocated, ask the layout planner how much memory each
process of THIS run needs (parameters, gradients, optimizer states, activations under the chosen
activation checkpointing, logits, transients, allocator margin) and compare it with what each
process has: free GPU memory, or on CPU the node's available RAM shared by its processes.

A run that cannot fit is refused with one line naming the estimate, what is available and a
layout that would fit (the planner's search over the same number of processes, else the smallest
multiple of it that fits), instead of being killed by the kernel minutes later with no word.
`train.memory_check = "warn"` prints that line and starts anyway; "off" skips the check.
"""
from __future__ import annotations

import dataclasses
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import ConfigError
from core.run_config import Config
from launch.context import DistContext
from parallel.planner.cluster import GIB, ClusterProfile, Efficiency, load_cluster
from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import MemoryBreakdown, memory_per_gpu
from parallel.planner.run_config import config_layout, run_settings
from parallel.planner.search import search

# On CPU (glibc malloc, no caching allocator) the measured peak RSS growth of a training step, less
# the model state, was 1.1-2.3x the planner's activations + logits + transients over nine shapes
# (0.9M-50M parameters, 2-8 layers, fp32 and bf16 autocast, with and without checkpointing; the
# ratio falls with depth: 1.4 at 8 layers): the backward holds activation gradients beside what is
# saved, and freed blocks are not all reused. So the margin adds those terms once more (covers 2x),
# plus a fixed reserve for the first step's one-off buffers (autograd threads, loader, evaluation
# batch; covers the 2.3x case). tests/planner/test_memory_check.py measures it again.
CPU_ACTIVATION_SLACK = 1.0
CPU_FRAGMENTATION = 0.0
CPU_RESERVED_GIB = 0.25
# On GPU the CUDA context is already out of the free memory we read; what comes later (NCCL
# buffers, cuBLAS workspaces) is most of a profile's reserve: we keep 1 GiB of it.
GPU_RESERVED_GIB = 1.0
GPU_PROFILES = (("H200", "h200"), ("H100", "h100-sxm"), ("A100", "a100-80gb"), ("B200", "b200"))
HEADROOM = 0.9            # a suggested layout leaves this much of the memory unplanned when it can
MAX_SCALE = 4096          # the most processes (x this job's) tried when none of this count fits
MIN_SEQ_LEN = 128         # the shortest train.seq_len suggested when no process count fits


@dataclass(frozen=True)
class Available:
    per_process: int     # bytes each process may use (the smallest over all processes)
    where: str           # how it was found, for the message
    per_node: int        # processes sharing one node (the planner keeps TP inside a node)


def check_memory(cfg: Config, ctx: DistContext) -> MemoryBreakdown | None:
    """Refuse (ConfigError) or warn when this run's layout is predicted not to fit; returns the
    estimate (None when the check is off or cannot be made). Every process decides the same: the
    estimate is the worst pipeline stage's and the memory the smallest any process has."""
    mode = cfg.train.memory_check
    if mode == "off":
        return None
    avail = _available(ctx)
    run = run_settings(cfg)
    layout = config_layout(run, ctx.world_size)
    # on CPU only the memory of this profile is used; speeds only rank suggestions (0 = timed later: any figure does)
    profile = local_profile(ctx.device, avail, cfg.metrics.cpu_peak_tflops or 1.0)
    need = _estimate(cfg, layout, profile, ctx.device)
    if need.fits:
        return need
    text = (f"train.memory_check: this run needs about {need.total / GIB:.1f} GiB per process ({_terms(need)}) "
            f"but {avail.per_process / GIB:.1f} GiB is available ({avail.where}); "
            f"{suggest(cfg, layout, profile, ctx.world_size)}; set train.memory_check = \"warn\" to start anyway")
    if mode == "error":
        raise ConfigError(text)
    if ctx.is_main:
        print(f"warning: {text}", file=sys.stderr, flush=True)
    return need


def _terms(m: MemoryBreakdown) -> str:
    return " + ".join(f"{t} {getattr(m, t) / GIB:.1f}" for t in m.TERMS)


def _estimate(cfg: Config, layout: Layout, profile: ClusterProfile, device: torch.device) -> MemoryBreakdown:
    need = memory_per_gpu(cfg.model, layout, Stack(), profile)
    extra = 0
    if device.type == "cpu" and cfg.checkpoint.async_save:     # async saves stage a copy in host memory
        extra = need.params + need.optimizer
    if device.type == "cuda" and cfg.parallel.fsdp_cpu_offload:  # the sharded state lives on the host
        extra = -(need.params + need.grads + need.optimizer)
    if device.type == "cuda" and cfg.parallel.engine == "deepspeed":
        # ZeRO-Offload keeps the optimizer state and fp32 gradients on the host, ZeRO-Infinity the
        # parameters too (the planner's offload model: parallel/planner/offload.py)
        if cfg.parallel.offload_optimizer != "none":
            extra -= need.grads + need.optimizer
        if cfg.parallel.offload_param != "none":
            extra -= need.params
    return dataclasses.replace(need, transient=need.transient + extra, total=need.total + extra)


def suggest(cfg: Config, layout: Layout, profile: ClusterProfile, world: int) -> str:
    """The planner's best layout for the same processes and global batch; else the fewest processes
    (a multiple of these, as much memory each, the same batch per process) that have one; else the
    same with a shorter train.seq_len (halved down to MIN_SEQ_LEN)."""
    seq = cfg.train.seq_len
    while True:
        for scale in (2 ** k for k in range(MAX_SCALE.bit_length())):
            found = _best(cfg, layout, profile, world * scale, layout.global_batch * scale, seq)
            if found:
                return _describe(found, world, scale, layout.global_batch * scale, seq != cfg.train.seq_len)
        if seq // 2 < MIN_SEQ_LEN:
            return (f"no layout fits even {world * MAX_SCALE} processes with this much memory each, down to "
                    f"train.seq_len {seq}: use a device with more memory")
        seq //= 2


def _best(cfg: Config, layout: Layout, profile: ClusterProfile, n: int, batch: int, seq: int):
    node = dataclasses.replace(profile, gpus_per_node=min(profile.gpus_per_node, n))
    try:
        return search(cfg.model, node, n, batch, seq, layout.dtype, Stack(), headroom=HEADROOM).ranked[0]
    except ValueError:          # nothing fits (or no layout divides this batch)
        return None


def _describe(best, world: int, scale: int, batch: int, shorter: bool) -> str:
    procs = f"{world} process{'es' if world > 1 else ''}"
    if scale == 1:
        what = f"a layout of these {procs} that fits"
    else:
        n = world * scale
        what = (f"no layout of {procs} fits; the fewest that do are {n} processes with as much memory each "
                f"({max(1, n // max(1, world))}x this job), global batch {batch} sequences")
    if shorter:
        what += f" and a shorter train.seq_len (no layout fits {MAX_SCALE}x this job at the configured one)"
    return (f"{what} ({best.memory.total / GIB:.1f} GiB each; `meshformer plan` ranks the others): "
            + " ".join(best.layout.overrides()))


def local_profile(device: torch.device, avail: Available, cpu_peak_tflops: float) -> ClusterProfile:
    """The planner's view of this machine, with the memory each process has now. On a GPU the
    profile of its name (H100's for a GPU without one: only the ranking of suggestions uses its
    speeds); on CPU a flat one (memory is what counts)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        profile = load_cluster(next((p for key, p in GPU_PROFILES if key in name), "h100-sxm"))
        return dataclasses.replace(profile, gpu_memory_gib=avail.per_process / GIB, gpus_per_node=avail.per_node,
                                   reserved_gib=GPU_RESERVED_GIB)
    flat = Efficiency(matmul=0.5, attention=0.5, fp8_matmul=0.5, hbm=0.5, nvlink=0.5, ib=0.5)
    return ClusterProfile(name="cpu", description="this machine's processes", gpus_per_node=avail.per_node,
                          gpu_memory_gib=avail.per_process / GIB, hbm_tbs=0.05,
                          peak_tflops={d: cpu_peak_tflops for d in ("fp32", "bf16", "fp8")},
                          nvlink_gbs=5.0, ib_gbs_per_gpu=1.0, nvlink_latency_us=10.0, ib_latency_us=20.0,
                          efficiency=flat, reserved_gib=CPU_RESERVED_GIB, fragmentation=CPU_FRAGMENTATION,
                          activation_slack=CPU_ACTIVATION_SLACK)


def _available(ctx: DistContext) -> Available:
    """Memory each process may use, the same answer on every process (one all_gather)."""
    if ctx.device.type == "cuda":
        mine = torch.cuda.mem_get_info(ctx.device)[0]
    else:
        mine = host_available_bytes()
    host = socket.gethostname()
    if ctx.distributed:
        everyone: list = [None] * ctx.world_size
        torch.distributed.all_gather_object(everyone, (host, mine))
    else:
        everyone = [(host, mine)]
    per_node = {h: sum(1 for other, _ in everyone if other == h) for h, _ in everyone}
    if ctx.device.type == "cuda":
        return Available(min(b for _, b in everyone), "free GPU memory, the least of any process",
                         max(per_node.values()))
    least = min(b // per_node[h] for h, b in everyone)
    n = max(per_node.values())
    return Available(least, f"available host memory {least * n / GIB:.1f} GiB / {n} process{'es' if n > 1 else ''} "
                            "on this node", n)


def host_available_bytes() -> int:
    """MemAvailable, capped by the cgroup's limit (a container is killed at its limit, whatever
    the host has free)."""
    avail = None
    for line in Path("/proc/meminfo").read_text().splitlines() if Path("/proc/meminfo").exists() else []:
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024
    if avail is None:
        raise ConfigError("train.memory_check: cannot read the available memory (/proc/meminfo) on this system; "
                          "set train.memory_check = \"off\"")
    for folder, limit, usage, cache in (("", "memory.max", "memory.current", "inactive_file"),     # cgroup v2
                                        ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes",
                                         "total_inactive_file")):                            # cgroup v1
        d = Path("/sys/fs/cgroup", folder)
        try:
            cap = (d / limit).read_text().strip()
            used = int((d / usage).read_text())
            stat = dict(line.split() for line in (d / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if cap.isdigit():    # page cache the kernel can drop is not used memory
            avail = min(avail, max(0, int(cap) - used + int(stat.get(cache, 0))))
    return avail
