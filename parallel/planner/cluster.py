"""A GPU cluster as the planner sees it: node size, memory, peak FLOP/s, links and achievable efficiency.

Profiles live in `configs/clusters/NAME.toml`; `load_cluster` takes a profile name or a path.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "configs" / "clusters"
GIB = 1024 ** 3


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak that real kernels reach on this hardware (one set for every layout)."""
    matmul: float           # dense GEMMs of a Transformer layer (bf16 / tf32)
    attention: float        # attention score and value products, counted as full T x T FLOPs
    fp8_matmul: float       # dense GEMMs in fp8 (of the fp8 peak)
    hbm: float              # memory-bound kernels (norms, activations, softmax, optimizer)
    nvlink: float           # NCCL bus bandwidth / link bandwidth inside a node
    ib: float               # NCCL bus bandwidth / link bandwidth between nodes


@dataclass(frozen=True)
class ClusterProfile:
    name: str
    description: str
    gpus_per_node: int
    gpu_memory_gib: float
    hbm_tbs: float                      # HBM bandwidth, TB/s
    peak_tflops: dict                   # dtype -> dense TFLOP/s ("fp32" means TF32 tensor cores)
    nvlink_gbs: float                   # per GPU, per direction, GB/s
    ib_gbs_per_gpu: float               # inter-node bandwidth per GPU, per direction, GB/s
    nvlink_latency_us: float
    ib_latency_us: float
    efficiency: Efficiency
    reserved_gib: float                 # memory the job can never use (context, workspaces)
    fragmentation: float                # allocator slack as a fraction of the predicted peak
    # extra fraction of activations + logits + transients: the backward's working set (one layer's
    # activation gradients) and allocator slack where `fragmentation` does not cover them. 0 for the
    # GPU profiles (validated without it); the trainer's CPU check sets 1 (trainer/memory_check.py).
    activation_slack: float = 0.0
    # [host]: what CPU offload (DeepSpeed ZeRO-Offload / -Infinity, planner/offload.py) runs on.
    # Defaults for a profile without [host]: a modest server (512 GiB; 8 channels of DDR4-3200 =
    # 205 GB/s) with PCIe Gen4 x16 GPUs (32 GB/s raw, ~25 GB/s achieved by pinned copies).
    host_memory_gib: float = 512.0      # host DRAM per node
    host_memory_gbs: float = 205.0      # peak host DRAM bandwidth per node, GB/s
    pcie_gbps: float = 25.0             # achieved host<->GPU copy bandwidth per GPU per direction, GB/s
    # [overhead]: host time on the critical path, for devices whose kernels are shorter than their
    # dispatch (CPU ranks, tiny models). 0 for the GPU profiles: large kernels queue ahead of the host.
    # Fitted by `meshformer plan calibrate`.
    layer_overhead_us: float = 0.0      # dispatching one layer's forward (backward: twice)
    tp_layer_overhead_us: float = 0.0   # extra per layer forward under TP (DTensor's dispatch)
    step_overhead_ms: float = 0.0       # per optimizer step (optimizer loop, clipping, loss sync)
    # per FSDP unit (a block, the root) per pass of a microbatch (forward, backward): FSDP2's hooks
    # (copy-in/out of the flat buffers, gradient copy for the reduction) and the call of the collective,
    # whatever the group's size; also where FSDP only replicates (meshformer's DP under TP or PP)
    fsdp_unit_overhead_us: float = 0.0
    # [network] overlap: whether collectives progress beside compute. False where ranks outnumber
    # cores (CPU ranks): no core is free to run them, so they add to the step however they are issued.
    comm_overlap: bool = True
    # cores the ranks of a node share (CPU ranks); 0 = every rank has its own device. Where ranks
    # outnumber cores, ranks that wait (a pipeline's fill and drain) lend their cores to the others.
    cores_per_node: int = 0

    @property
    def memory_bytes(self) -> int:
        return int(self.gpu_memory_gib * GIB)

    def peak_flops(self, dtype: str) -> float:
        peak = float(self.peak_tflops.get(dtype, 0.0)) * 1e12
        if peak <= 0:
            have = ", ".join(k for k, v in self.peak_tflops.items() if v > 0)
            raise ValueError(f"cluster {self.name}: no {dtype} tensor-core peak (this GPU has: {have}); "
                             f"choose precision.dtype among those")
        return peak

    def matmul_flops(self, dtype: str) -> float:
        """Achievable dense-GEMM FLOP/s per GPU in this dtype."""
        eff = self.efficiency.fp8_matmul if dtype == "fp8" else self.efficiency.matmul
        return self.peak_flops(dtype) * eff

    def attention_flops(self, dtype: str) -> float:
        # fp8 attention kernels are not assumed: attention runs in bf16 under fp8 training
        return self.peak_flops("bf16" if dtype == "fp8" else dtype) * self.efficiency.attention

    @property
    def hbm_bytes_per_s(self) -> float:
        return self.hbm_tbs * 1e12 * self.efficiency.hbm


_REQUIRED = {"name", "gpus_per_node", "gpu_memory_gib", "hbm_tbs", "peak_tflops", "network", "efficiency"}


def list_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTER_DIR.glob("*.toml"))


def load_cluster(name_or_path: str) -> ClusterProfile:
    path = Path(name_or_path)
    if not path.suffix:
        path = CLUSTER_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise FileNotFoundError(f"cluster profile {name_or_path!r} not found: give one of "
                                f"{', '.join(list_clusters())} or a path to a .toml profile")
    with open(path, "rb") as f:
        t = tomllib.load(f)
    missing = sorted(_REQUIRED - t.keys())
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    net, eff, mem, host = t["network"], t["efficiency"], t.get("memory", {}), t.get("host", {})
    ovh = t.get("overhead", {})
    try:
        efficiency = Efficiency(**{f.name: float(eff[f.name]) for f in fields(Efficiency)})
    except KeyError as e:
        raise ValueError(f"{path}: [efficiency] needs {e.args[0]} (a fraction of peak in (0, 1])") from None
    for f in fields(Efficiency):
        v = getattr(efficiency, f.name)
        if not 0 < v <= 1:
            raise ValueError(f"{path}: efficiency.{f.name} = {v} must be in (0, 1]")
    try:
        profile = ClusterProfile(
            name=t["name"], description=t.get("description", ""),
            gpus_per_node=int(t["gpus_per_node"]), gpu_memory_gib=float(t["gpu_memory_gib"]),
            hbm_tbs=float(t["hbm_tbs"]), peak_tflops={k: float(v) for k, v in t["peak_tflops"].items()},
            nvlink_gbs=float(net["nvlink_gbs"]), ib_gbs_per_gpu=float(net["ib_gbs_per_gpu"]),
            nvlink_latency_us=float(net.get("nvlink_latency_us", 3.0)),
            ib_latency_us=float(net.get("ib_latency_us", 6.0)),
            efficiency=efficiency,
            reserved_gib=float(mem.get("reserved_gib", 2.0)), fragmentation=float(mem.get("fragmentation", 0.1)),
            activation_slack=float(mem.get("activation_slack", 0.0)),
            host_memory_gib=float(host.get("memory_gib", 512.0)), host_memory_gbs=float(host.get("memory_gbs", 205.0)),
            pcie_gbps=float(host.get("pcie_gbps", 25.0)),
            layer_overhead_us=float(ovh.get("layer_us", 0.0)), tp_layer_overhead_us=float(ovh.get("tp_layer_us", 0.0)),
            step_overhead_ms=float(ovh.get("step_ms", 0.0)), fsdp_unit_overhead_us=float(ovh.get("fsdp_unit_us", 0.0)),
            comm_overlap=bool(net.get("overlap", True)),
            cores_per_node=int(t.get("cores_per_node", 0)))
    except KeyError as e:
        raise ValueError(f"{path}: [network] needs {e.args[0]} (GB/s per GPU per direction)") from None
    if profile.gpus_per_node < 1 or profile.gpu_memory_gib <= 0:
        raise ValueError(f"{path}: gpus_per_node and gpu_memory_gib must be positive")
    if min(profile.layer_overhead_us, profile.tp_layer_overhead_us, profile.step_overhead_ms,
           profile.fsdp_unit_overhead_us) < 0:
        raise ValueError(f"{path}: [overhead] layer_us, tp_layer_us, step_ms and fsdp_unit_us must be >= 0")
    if min(profile.host_memory_gib, profile.host_memory_gbs, profile.pcie_gbps) <= 0:
        raise ValueError(f"{path}: [host] memory_gib, memory_gbs and pcie_gbps must be positive")
    return profile
