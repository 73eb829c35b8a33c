"""One layout's predicted memory and speed, with the throughput figures people compare.

Two FLOP rates are reported, because papers differ:
- model TFLOP/s per GPU (and MFU) counts the FLOPs the model needs, ModelConfig.flops_per_token
  (3 passes: forward + backward), whatever is recomputed;
- hardware TFLOP/s per GPU also counts the recomputed forward work. Narayanan et al. (SC'21)
  report this one: their 96*B*s*l*h^2*(1 + s/6h + V/16lh) is 4 passes over the layers (with full
  recomputation) and 3 over the head, which is exactly flops_per_token + the layers' forward.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.model_config import ModelConfig

from .cluster import ClusterProfile
from .layout import Layout, Stack
from .memory import MemoryBreakdown, memory_per_gpu
from .shapes import flop_split
from .timing import TimeBreakdown, step_time


def recompute_flops_per_token(cfg: ModelConfig, layout: Layout) -> float:
    fl = flop_split(cfg, layout.seq_len)
    if layout.ac == "full":
        return cfg.n_layers * (fl.dense_per_layer + fl.attention_per_layer) / 3
    if layout.ac == "selective":
        return cfg.n_layers * fl.attention_per_layer / 3
    return 0.0


@dataclass(frozen=True)
class Prediction:
    layout: Layout
    memory: MemoryBreakdown
    time: TimeBreakdown
    tokens_per_s: float
    model_tflops_per_gpu: float
    hardware_tflops_per_gpu: float
    mfu: float

    @property
    def fits(self) -> bool:
        return self.memory.fits

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "gpus": self.layout.gpus, "global_batch": self.layout.global_batch,
                "global_batch_tokens": self.layout.global_batch * self.layout.seq_len,
                "fits": self.fits, "step_s": self.time.step, "tokens_per_s": self.tokens_per_s,
                "model_tflops_per_gpu": self.model_tflops_per_gpu,
                "hardware_tflops_per_gpu": self.hardware_tflops_per_gpu, "mfu": self.mfu,
                "memory_gib": {k: (v / 1024 ** 3 if isinstance(v, int) and not isinstance(v, bool) and k != "stage" else v)
                               for k, v in self.memory.to_dict().items()},
                "time_s": self.time.to_dict(), "overrides": " ".join(self.layout.overrides())}


def predict(cfg: ModelConfig, layout: Layout, cluster: ClusterProfile, stack: Stack | None = None) -> Prediction:
    """Memory and throughput of `layout` for model `cfg` on `cluster`. Raises ValueError when the
    layout cannot run the model at all (the message names the field)."""
    stack = stack or Stack()
    layout.validate(cfg)
    cluster.peak_flops(layout.dtype)          # fails early, naming the dtype, on GPUs without it
    mem = memory_per_gpu(cfg, layout, stack, cluster)
    t = step_time(cfg, layout, stack, cluster)
    tokens = layout.global_batch * layout.seq_len
    tps = tokens / t.step
    model_flops = cfg.flops_per_token(layout.seq_len)
    hw_flops = model_flops + recompute_flops_per_token(cfg, layout)
    per_gpu = tps / layout.gpus
    return Prediction(layout=layout, memory=mem, time=t, tokens_per_s=tps,
                      model_tflops_per_gpu=per_gpu * model_flops / 1e12,
                      hardware_tflops_per_gpu=per_gpu * hw_flops / 1e12,
                      mfu=per_gpu * model_flops / cluster.peak_flops(layout.dtype))
