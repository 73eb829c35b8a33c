"""The attention core: softmax(q k^T * scale + bias) v, with the mask described by positions.

`AttnMask` says what each query may see in terms of the queries' and keys' absolute positions
(and, where set, their document indices, a window and ALiBi slopes) rather than as a dense
matrix, so the same description yields the mask of any (query block, key block) pair. That is
the seam for context parallel: parallel/ may replace a block's `attention.core` with a module
that calls `core.block(q, k_block, v_block, mask_for_that_block)` for K/V blocks held by other
ranks and merges the partial results with their log-sum-exp (online softmax). The model itself
never splits anything.

The contract with such a caller: everything the mask depends on is per-token data that travels
with the tokens, or a constant. Per query: `q_pos` (and `q_doc`); per key: `k_pos` (and `k_doc`);
constants: `window`, `alibi_slopes`. A rank that receives another rank's K/V block must receive
that block's positions and document ids with it and call `mask.keys(k_pos, k_doc)`; positions are
those the model used (per document under doc masking: they restart at 0 after each end-of-text),
and document ids are global to the row (`doc_ids` numbers them over the whole, unsplit row, so
chunks of one row agree). The rule: key j is visible to query i iff
    k_pos[j] <= q_pos[i]  and  q_doc[i] == k_doc[j] (doc ids set)  and  q_pos[i] - k_pos[j] < window (set).
Comparing positions is only meaningful within one document, which the doc test guarantees.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttnMask:
    q_pos: torch.Tensor                         # [T] or [B, T]: absolute positions of the queries
    k_pos: torch.Tensor                         # [S] or [B, S]: absolute positions of the keys
    alibi_slopes: torch.Tensor | None = None    # [H] (this rank's heads): bias -slope * (i - j)
    # q_pos == k_pos == 0..T-1 and nothing else set: plain causal, SDPA's own causal kernel
    aligned: bool = False
    # learned relative bias (trainer/relative_bias.py): distances i - j [B|1, T, S] -> [B|1, H, T, S]
    rel_bias: Callable[[torch.Tensor], torch.Tensor] | None = None
    q_doc: torch.Tensor | None = None           # [B, T] document index of each query (doc masking)
    k_doc: torch.Tensor | None = None           # [B, S] document index of each key
    window: int | None = None                   # sliding window: a query sees its last `window` positions

    def keys(self, k_pos: torch.Tensor, k_doc: torch.Tensor | None = None) -> "AttnMask":
        """The same rule for another block of keys (context parallel: K/V from another rank),
        given that block's positions and, under doc masking, its document ids."""
        if self.q_doc is not None and k_doc is None:
            raise ValueError("AttnMask.keys: this mask is document-masked; pass the key block's document ids (k_doc)")
        return replace(self, k_pos=k_pos, k_doc=k_doc, aligned=False)

    def visible(self) -> torch.Tensor:
        """Boolean [B or 1, 1, T, S]: True where key j may be seen by query i."""
        q = self.q_pos if self.q_pos.dim() == 2 else self.q_pos[None]
        k = self.k_pos if self.k_pos.dim() == 2 else self.k_pos[None]
        dist = q[:, :, None] - k[:, None, :]                                 # [B|1, T, S], i - j
        ok = dist >= 0
        if self.window is not None:
            ok = ok & (dist < self.window)
        if self.q_doc is not None:
            ok = ok & (self.q_doc[:, :, None] == self.k_doc[:, None, :])
        return ok[:, None]

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask [B or 1, H or 1, T, S]: 0 where visible, -inf where not, minus the ALiBi
        term; None for the aligned causal case (SDPA's is_causal)."""
        if (self.aligned and self.alibi_slopes is None and self.window is None and self.q_doc is None
                and self.rel_bias is None):
            return None
        q = self.q_pos if self.q_pos.dim() == 2 else self.q_pos[None]
        k = self.k_pos if self.k_pos.dim() == 2 else self.k_pos[None]
        dist = (q[:, :, None] - k[:, None, :]).to(torch.float32)[:, None]   # [B|1, 1, T, S], i - j
        mask = torch.where(self.visible(), 0.0, float("-inf"))
        if self.alibi_slopes is not None:
            mask = mask - self.alibi_slopes.to(dist.device)[:, None, None] * dist.clamp(min=0)
        if self.rel_bias is not None:
            mask = mask + self.rel_bias(q[:, :, None] - k[:, None, :])
        return mask.to(dtype)


def doc_ids(tokens: torch.Tensor, eot_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions, document ids), both [B, T] int64, of packed rows `tokens` [B, T] in which each
    document is followed by end-of-text (data/loader.py): the end-of-text token belongs to the
    document it ends (it is that document's last input; what it predicts is the next one's first
    token, as in torchtitan), the next token starts a new document at position 0. A context-parallel
    engine calls this on whole rows before splitting them, so every chunk gets the row's numbering."""
    ends = tokens == eot_id
    doc = torch.cumsum(ends.long(), dim=1) - ends.long()                   # eot ends, not starts, its doc
    idx = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    # start of each token's document: the index after the last eot strictly before it (cummax of those)
    after_eot = torch.where(ends, idx + 1, torch.zeros_like(idx))
    start = torch.cummax(torch.cat([torch.zeros_like(idx[:, :1]), after_eot[:, :-1]], dim=1), dim=1).values
    return idx - start, doc


# Up to this many keys, bf16 attention on a CPU is faster as two batched bf16 GEMMs around a softmax
# of the materialised scores than through torch's CPU flash-attention kernel (bench/attention_cpu.py's products on the idle 2-core machine, forward +
# backward, causal, 64-dim heads: 3.1x at 256 keys, 1.8x at 512, 0.77x at 1024, 0.58x at 2048; in
# the whole bf16 step, attention fell from 59 ms to ~17 ms: bench/RESULTS.md). The price is memory: the
# bf16 probabilities [B, H, T, S] are kept for backward, which flash avoids; past this length
# flash wins on both counts.
CPU_BF16_EXPLICIT_MAX_KEYS = 512


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                       scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v by batched GEMMs in q's dtype (bias None: causal, top-left
    aligned as SDPA's is_causal). The heads sharing a key/value head (GQA) are stacked along the
    query axis, so their keys are read once and never copied."""
    b, h, t, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    rep = h // hkv
    if bias is None:
        bias = torch.full((t, s), float("-inf"), dtype=q.dtype, device=q.device).triu_(1).repeat(rep, 1)
    else:
        bias = bias.expand(b, h, t, s).reshape(b * hkv, rep * t, s)
    scores = torch.baddbmm(bias, q.reshape(b * hkv, rep * t, d), k.reshape(b * hkv, s, d).transpose(1, 2),
                           alpha=scale if scale is not None else d ** -0.5)
    return torch.bmm(torch.softmax(scores, dim=-1), v.reshape(b * hkv, s, d)).view(b, h, t, d)


def use_explicit(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `explicit_attention` is the faster kernel for these operands (see above); fp32 and
    every accelerator keep SDPA."""
    return q.device.type == "cpu" and q.dtype == torch.bfloat16 and k.shape[2] <= CPU_BF16_EXPLICIT_MAX_KEYS


class AttentionCore(nn.Module):
    """No parameters: q [B, H, T, D], k/v [B, Hkv, S, D] -> [B, H, T, D]."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale          # None: SDPA's 1/sqrt(head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask) -> torch.Tensor:
        bias = mask.bias(q.dtype)
        if use_explicit(q, k):
            return explicit_attention(q, k, v, bias, self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                              enable_gqa=q.shape[1] != k.shape[1], scale=self.scale)

    def block(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention of q over one block of keys: (output [B, H, T, D], log-sum-exp [B, H, T]),
        in at least fp32 arithmetic, so blocks merge by their log-sum-exps without a low-precision round. A query row that sees no
        key of the block gets output 0 and log-sum-exp -inf (it contributes nothing to a merge)."""
        if q.shape[1] != k.shape[1]:
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scale = self.scale if self.scale is not None else q.shape[-1] ** -0.5
        work = torch.promote_types(q.dtype, torch.float32)
        scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
        bias = mask.bias(work)
        if bias is None:   # aligned causal: build it (a block computation always needs it explicitly)
            bias = replace(mask, aligned=False).bias(work)
        scores = scores + bias
        # A row that sees no key: logsumexp's gradient there is exp(-inf - -inf) = NaN, and NaN x 0
        # is NaN, so such rows take the log-sum-exp of zeros (finite, gradient cut by masked_fill)
        empty = torch.isneginf(scores).all(dim=-1)
        lse = torch.logsumexp(scores.masked_fill(empty[..., None], 0.0), dim=-1).masked_fill(empty, float("-inf"))
        probs = torch.exp(scores - lse.masked_fill(empty, 0.0)[..., None])
        return torch.matmul(probs, v.to(work)).to(q.dtype), lse
