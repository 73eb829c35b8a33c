"""Fit a cluster profile's efficiency constants to short measured runs, and check it on others.

`meshformer plan calibrate` (trainer/calibrate.py) times real training steps of a few layouts on
the user's own cluster; this module turns those figures into a profile the planner reads with
`--cluster FILE`. The hardware figures (matmul rate, memory bandwidth, link bandwidth and latency)
are the microbenchmarks measured in the same launch; what is fitted is the latency of one ring
step of a collective and the host overheads of `[overhead]` that dominate tiny models on CPU (see
PARAMS); the `[efficiency]` fractions stay 1 of the measured rates. Residuals are log(predicted /
measured) tokens/s, so every layout weighs the same whatever its speed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from scipy.optimize import least_squares

from core.model_config import ModelConfig

from .cluster import ClusterProfile, Efficiency
from .layout import Layout, Stack
from .predict import predict

# (name, lower bound, upper bound, start): latency_us one ring step of a collective; the overheads
# host micro- / milliseconds: fsdp_unit_us per FSDP unit and pass (FSDP2's hooks and collective call),
# tp_layer_us per layer forward under TP, step_ms per step. Four, fitted to six layouts: with as many
# parameters as layouts the fit passes through every measurement, noise included, and says nothing
# about the held-out ones. Not fitted: the matmul efficiency stays 1 (the matmul rate measured while
# all ranks run one): the tiny model's GEMMs are ~5% of a step here, and fits that had it free put it
# at its bound 1 or traded it against step_ms. The link bandwidth is the measured all-reduce's (tiny
# models send little), and `[overhead] layer_us` stays 0: every layout but accum2 dispatches the
# same 4 layer passes per rank, so the runs cannot tell it from step_ms and fsdp_unit_us.
PARAMS = (("latency_us", 1.0, 1e5, 100.0), ("fsdp_unit_us", 0.0, 1e6, 500.0),
          ("tp_layer_us", 0.0, 1e6, 500.0), ("step_ms", 0.0, 1e4, 10.0))


@dataclass(frozen=True)
class Measured:
    name: str
    model: ModelConfig
    layout: Layout
    tokens_per_s: float


def base_profile(machine: dict, world: int, memory_gib: float) -> ClusterProfile:
    """The machine as measured (every rank on one 'node'), efficiencies 1 before the fit."""
    flops = machine["matmul_flops"] / 1e12
    return ClusterProfile(
        name="calibrated", description=f"{world} ranks on this machine, fitted by meshformer plan calibrate",
        gpus_per_node=world, gpu_memory_gib=memory_gib, hbm_tbs=machine["copy_bytes_per_s"] / 1e12,
        peak_tflops={"fp32": flops, "bf16": flops, "fp8": 0.0},
        nvlink_gbs=machine["allreduce_bus_bytes_per_s"] / 1e9, ib_gbs_per_gpu=machine["allreduce_bus_bytes_per_s"] / 1e9,
        nvlink_latency_us=machine["step_latency_s"] * 1e6, ib_latency_us=machine["step_latency_s"] * 1e6,
        efficiency=Efficiency(matmul=1.0, attention=1.0, fp8_matmul=1.0, hbm=1.0, nvlink=1.0, ib=1.0),
        reserved_gib=0.5, fragmentation=0.1, activation_slack=1.0,
        comm_overlap=world < machine.get("cores", 1), cores_per_node=machine.get("cores", 0))


def with_params(base: ClusterProfile, x) -> ClusterProfile:
    latency_us, fsdp_unit_us, tp_layer_us, step_ms = (float(v) for v in x)
    return replace(base, nvlink_latency_us=latency_us, ib_latency_us=latency_us, fsdp_unit_overhead_us=fsdp_unit_us,
                   tp_layer_overhead_us=tp_layer_us, step_overhead_ms=step_ms)


def predicted(profile: ClusterProfile, run: Measured) -> float:
    return predict(run.model, run.layout, profile, Stack()).tokens_per_s


def fit(base: ClusterProfile, runs: list[Measured]) -> ClusterProfile:
    """The profile whose predictions best match `runs` (least squares on log tokens/s)."""
    if not runs:
        raise ValueError("calibrate: no measured layout to fit")
    lo, hi, x0 = (np.array([p[i] for p in PARAMS]) for i in (1, 2, 3))

    def residuals(x):
        prof = with_params(base, x)
        return [math.log(predicted(prof, r) / r.tokens_per_s) for r in runs]

    # start from the measured link latency where there is one
    x0[0] = min(max(base.nvlink_latency_us, lo[0]), hi[0])
    sol = least_squares(residuals, x0, bounds=(lo, hi), x_scale=np.maximum(x0, 1e-3), diff_step=1e-3)
    return with_params(base, sol.x)


def report(profile: ClusterProfile, runs: list[Measured]) -> list[tuple[str, float, float, float]]:
    """(name, predicted tokens/s, measured tokens/s, predicted / measured - 1) per run."""
    out = []
    for r in runs:
        p = predicted(profile, r)
        out.append((r.name, p, r.tokens_per_s, p / r.tokens_per_s - 1))
    return out


def profile_toml(p: ClusterProfile, note: str = "") -> str:
    """The profile as a file `load_cluster` reads (`--cluster FILE`)."""
    e = p.efficiency
    lines = [f"# {note}" if note else "# fitted by meshformer plan calibrate",
             f'name = "{p.name}"', f'description = "{p.description}"', f"gpus_per_node = {p.gpus_per_node}", f"cores_per_node = {p.cores_per_node}",
             f"gpu_memory_gib = {p.gpu_memory_gib:.6g}", f"hbm_tbs = {p.hbm_tbs:.6g}", "", "[peak_tflops]"]
    lines += [f"{k} = {v:.6g}" for k, v in p.peak_tflops.items()]
    lines += ["", "[network]", f"nvlink_gbs = {p.nvlink_gbs:.6g}", f"ib_gbs_per_gpu = {p.ib_gbs_per_gpu:.6g}",
              f"nvlink_latency_us = {p.nvlink_latency_us:.6g}", f"ib_latency_us = {p.ib_latency_us:.6g}",
              f"overlap = {'true' if p.comm_overlap else 'false'}",
              "", "[efficiency]"]
    lines += [f"{k} = {getattr(e, k):.6g}" for k in ("matmul", "attention", "fp8_matmul", "hbm", "nvlink", "ib")]
    lines += ["", "[memory]", f"reserved_gib = {p.reserved_gib:g}", f"fragmentation = {p.fragmentation:g}",
              f"activation_slack = {p.activation_slack:g}", "", "[overhead]",
              f"layer_us = {p.layer_overhead_us:.6g}", f"tp_layer_us = {p.tp_layer_overhead_us:.6g}",
              f"step_ms = {p.step_overhead_ms:.6g}", f"fsdp_unit_us = {p.fsdp_unit_overhead_us:.6g}", ""]
    return "\n".join(lines)
