"""A CPU's matmul limit for MFU: the model's own GEMMs, timed as bare matmuls on this process.

A CPU has no datasheet peak that a training step can be held to (it depends on the BLAS, the
shapes, the precision, the threads and the other jobs on the machine), so with
`metrics.cpu_peak_tflops = 0` (the default) the trainer times, at start-up and again at every
logging step (keeping the fastest: `MatmulLimit`), every GEMM one Transformer block and the
output head run in a training step (forward, and the two backward
products of each linear; attention's score and value products), at the run's precision and on the
threads it trains with. Their FLOPs over their time is the "peak" MFU divides by: the step's
share of what the machine's matmuls reach at the model's shapes (1.0 = nothing but matmuls).
One block stands for all (blocks are identical, and the rate is what counts, not the total), and
the tokens per product are capped (`MAX_TOKENS`) so that a big model on a CPU measures in a second.
`bench/vs_hf.py` prints the same share for a whole step against Hugging Face's.
"""
from __future__ import annotations

import time

import torch

from core.model_config import ModelConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp8": torch.bfloat16}   # fp8 on CPU computes in bf16
MAX_TOKENS = 2048     # tokens per timed product at start-up (the tiny configs' micro-batch is 16 x 128)


def gemm_shapes(mc: ModelConfig, B: int, T: int, layers: int | None = None) -> list[tuple[int, int, int, int]]:
    """(batch, m, k, n) of every matmul of one training step: each linear layer x[M,K] @ W[K,N]
    runs forward, and backward once for the input gradient (M,N @ N,K) and once for the weight
    gradient (K,M @ M,N); attention's QK^T and PV likewise (batched over B x heads). A MoE
    block's experts stand as one product of the routed tokens (M x top_k) at the expert width,
    the grouped GEMM's total. `layers` (default all) blocks, plus the output head."""
    M, d, hd, H, kv = B * T, mc.dim, mc.head_dim, mc.n_heads, mc.kv_heads
    attn = [(M, d, H * hd), (M, d, kv * hd), (M, d, kv * hd), (M, H * hd, d)]
    out = []
    for layer in range(mc.n_layers if layers is None else layers):
        if mc.is_moe_layer(layer):
            width = mc.expert_hidden
            routed = M * mc.moe_top_k
            shared = width * mc.moe_shared_experts
            ups = 2 if mc.activation == "swiglu" else 1
            mlp = [(routed, d, width)] * ups + [(routed, width, d), (M, d, mc.moe_experts)]
            if shared:
                mlp += [(M, d, shared)] * ups + [(M, shared, d)]
        else:
            mlp = [(M, d, mc.hidden)] * (2 if mc.activation == "swiglu" else 1) + [(M, mc.hidden, d)]
        for m, K, N in attn + mlp:
            out += [(1, m, K, N), (1, m, N, K), (1, K, m, N)]
        out += [(B * H, T, hd, T), (B * H, T, T, hd), (B * H, hd, T, T)]   # scores = q k^T: forward, 2 backward
        out += [(B * H, T, T, hd), (B * H, T, hd, T), (B * H, T, T, hd)]   # out = p v: forward, 2 backward
    out += [(1, M, d, mc.vocab_size), (1, M, mc.vocab_size, d), (1, d, M, mc.vocab_size)]
    return out


def shape_flops(shapes) -> float:
    return sum(2.0 * b * m * k * n for b, m, k, n in shapes)


class BareGemms:
    """The given GEMMs as bare matmuls on random operands of their shapes and precision."""

    def __init__(self, shapes, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        self.pairs = [(torch.randn(b, m, k, generator=g, dtype=dtype).squeeze(0),
                       torch.randn(b, k, n, generator=g, dtype=dtype).squeeze(0)) for b, m, k, n in shapes]
        self.flops = shape_flops(shapes)
        self()

    def __call__(self) -> float:
        """Seconds for one pass over every product."""
        t0 = time.perf_counter()
        for a, w in self.pairs:
            (torch.bmm if a.dim() == 3 else torch.mm)(a, w)
        return time.perf_counter() - t0


class MatmulLimit:
    """The fastest this process's matmuls have run the model's GEMM shapes (one block and the head:
    blocks are identical and the rate is what counts) during the run. Timed at start-up (best of
    `passes`) and again, one pass, at every logging step (`retime`, outside the steps' timing): on
    a shared machine a start-up moment of load would otherwise set a low limit for the whole run
    and MFU would pass 100% once the load went. Every rank retimes at the same step, so ranks that
    share a machine's cores share them while timing as they do while training."""

    def __init__(self, mc: ModelConfig, micro_batch: int, seq_len: int, dtype: str, passes: int = 3):
        T = min(seq_len, MAX_TOKENS)
        B = max(1, min(micro_batch, MAX_TOKENS // T))
        # a dense and a MoE block where the model has both
        self.gemms = BareGemms(gemm_shapes(mc, B, T, layers=mc.moe_every if mc.moe_experts else 1), DTYPES[dtype])
        self.flops_per_s = self.gemms.flops / min(self.gemms() for _ in range(passes))

    def retime(self) -> float:
        self.flops_per_s = max(self.flops_per_s, self.gemms.flops / self.gemms())
        return self.flops_per_s

