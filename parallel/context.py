"""Context parallel: each sequence cut over the `cp` mesh dimension, attention by ring attention.

A sequence of T tokens is cut into 2 x cp equal chunks and cp rank r holds chunks r and 2cp-1-r
(zigzag / head-tail): under a causal mask an early chunk sees little and a late one much, so every
rank gets one of each and the work is even. The model runs on those T/cp tokens with their
absolute positions (`Transformer.forward(positions=...)`); everything but attention is per token.
Attention needs every key: each block's `attention.core` is replaced by `RingAttention`, which
passes the K/V block (with its keys' positions and document ids) around the cp ring with
torch.distributed send/recv (batch_isend_irecv), attends to each block with the core's
`block()` (output and log-sum-exp) and merges them by their log-sum-exps (online softmax).
torch's own context_parallel (torch.distributed.tensor.experimental) has no CPU path, so on gloo
the ring is ours. The pass is an autograd function whose backward sends the gradients back the
other way round the ring, so backward is plain autograd through the blocks. A query chunk skips
the keys that lie wholly in its future (half of every block but its own under zigzag).

`parallel.cp_kv = "allgather"` gathers all K/V blocks at once instead (torch.distributed.nn's
autograd-aware all_gather; fewer, larger messages, but every rank then holds all keys).
"""
from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

# AttnMask fields that describe the keys and so travel with a K/V block (k_doc: document ids
# under document masking, where the mask has them)
KEY_FIELDS = ("k_pos", "k_doc")
# Queries per attention tile: its [tile, keys] scores are what one block holds at once. 64, not
# 256: measured with bench/context_parallel.py (2 cores, loaded), CP2 at 8192 tokens 78 vs 129 MiB
# per rank and 236 vs 156 tokens/s (smaller tiles stay in cache; row results do not depend on it).
QUERY_TILE = 64


def zigzag_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Positions of cp rank `rank`'s tokens: chunks `rank` and 2cp-1-rank of 2cp equal chunks."""
    n = seq_len // (2 * cp)
    first = torch.arange(rank * n, (rank + 1) * n, device=device)
    last = torch.arange((2 * cp - 1 - rank) * n, (2 * cp - rank) * n, device=device)
    return torch.cat([first, last])


def ring_peers(group) -> tuple[int, int]:
    """Global ranks of the next and the previous rank in `group`'s ring."""
    me, size = dist.get_rank(group), dist.get_world_size(group)
    return dist.get_global_rank(group, (me + 1) % size), dist.get_global_rank(group, (me - 1) % size)


def ring_pass(tensors: list[torch.Tensor], group, forward: bool = True) -> list[torch.Tensor]:
    """Send `tensors` to the next rank of the ring and receive the previous rank's (backward=the
    other way round), all in one batch_isend_irecv."""
    nxt, prev = ring_peers(group)
    to, frm = (nxt, prev) if forward else (prev, nxt)
    out = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, o, frm, group) for o in out]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


class _RingPass(torch.autograd.Function):
    """ring_pass of one tensor whose gradient goes back the other way."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return ring_pass([t], group)[0]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ring_pass([grad], ctx.group, forward=False)[0], None


def select_rows(mask, idx: torch.Tensor):
    """The mask for the queries `idx` only (positions and, where set, document ids)."""
    doc = getattr(mask, "q_doc", None)
    return replace(mask, q_pos=mask.q_pos.index_select(-1, idx),
                   **({"q_doc": doc.index_select(-1, idx)} if doc is not None else {}))


def key_meta(mask) -> dict[str, torch.Tensor]:
    names = {f.name for f in fields(mask)}
    return {n: getattr(mask, n) for n in KEY_FIELDS if n in names and getattr(mask, n) is not None}


def retarget(mask, meta: dict[str, torch.Tensor]):
    """The mask's rule for another key block, given that block's positions and document ids."""
    return mask.keys(**meta)


def merge(blocks: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> torch.Tensor:
    """Softmax over all keys from per-block (output, log-sum-exp): weights exp(lse_b - lse). Every
    query sees at least itself, so the total lse is finite; a block's -inf rows get weight 0."""
    lse = torch.logsumexp(torch.stack([lse for _, lse in blocks]), dim=0)
    out = sum(o.to(lse.dtype) * torch.exp(b_lse - lse)[..., None] for o, b_lse in blocks)
    return out.to(dtype)


class RingAttention(nn.Module):
    """Stands in for an AttentionCore (same call) on a context-parallel rank."""

    def __init__(self, inner: nn.Module, group, kv: str = "ring"):
        super().__init__()
        self.inner, self.group, self.kv = inner, group, kv

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> torch.Tensor:
        if self.kv == "allgather":
            return self.all_gathered(q, k, v, mask)
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        seq = q.shape[2] * size
        q_abs = zigzag_index(seq, size, rank, q.device)
        kv, meta = torch.stack([k, v]), key_meta(mask)
        blocks = []
        for step in range(size):
            k_abs = zigzag_index(seq, size, (rank - step) % size, q.device)
            blocks.append(self.partial(q, kv, retarget(mask, meta), q_abs, k_abs))
            if step < size - 1:   # the block of the rank `step + 1` places before this one, next
                kv = _RingPass.apply(kv, self.group)
                meta = dict(zip(meta, ring_pass(list(meta.values()), self.group)))
        return merge(blocks, q.dtype)

    def partial(self, q: torch.Tensor, kv: torch.Tensor, mask, q_abs: torch.Tensor, k_abs: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(output, lse) of q over one K/V block. `q_abs`/`k_abs`: the tokens' places in the row
        (the mask's positions restart per document under doc masking, so they do not order the
        row). Attention is causal in row order whatever else the mask says, so only the keys that
        some query follows and the queries that follow some key are computed; the rest are 0 and
        -inf."""
        keys = torch.nonzero(k_abs <= q_abs.max()).flatten()
        rows = torch.nonzero(q_abs >= k_abs.min()).flatten()
        shape = (*q.shape[:-1],)
        if len(keys) == 0 or len(rows) == 0:
            # nothing visible; the zero term keeps the block in the autograd graph so every rank
            # runs the same backward passes round the ring
            zero = kv.sum() * 0
            return q.new_zeros(q.shape) + zero, q.new_full(shape, float("-inf"),
                                                                 dtype=torch.promote_types(q.dtype, torch.float32))
        if len(keys) < len(k_abs):
            kv = kv.index_select(3, keys)
            mask = replace(mask, **{n: t.index_select(-1, keys) for n, t in key_meta(mask).items()})
        if len(rows) == len(q_abs):
            return self.tiled(q, kv, mask)
        o, lse = self.tiled(q.index_select(2, rows), kv, select_rows(mask, rows))
        out = q.new_zeros(q.shape).index_copy(2, rows, o)
        full = torch.full(shape, float("-inf"), dtype=lse.dtype, device=q.device).index_copy(2, rows, lse)
        return out, full

    def tiled(self, q: torch.Tensor, kv: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """core.block over tiles of QUERY_TILE queries, each recomputed in backward (checkpoint):
        what backward keeps is q, K/V and the outputs, not the tiles' [T, S] probabilities, and
        the scores held at once are one tile's, as in flash attention."""
        outs, lses = [], []
        for lo in range(0, q.shape[2], QUERY_TILE):
            idx = torch.arange(lo, min(lo + QUERY_TILE, q.shape[2]), device=q.device)
            sub = mask if len(idx) == q.shape[2] else select_rows(mask, idx)
            o, lse = checkpoint(self.inner.block, q[:, :, lo:lo + QUERY_TILE], kv[0], kv[1], sub, use_reentrant=False)
            outs.append(o)
            lses.append(lse)
        return torch.cat(outs, dim=2), torch.cat(lses, dim=2)

    def all_gathered(self, q, k, v, mask) -> torch.Tensor:
        """Every rank's K/V at once (autograd-aware all_gather), then the core over all keys."""
        kv = torch.cat(dist_fn.all_gather(torch.stack([k, v]), group=self.group), dim=3)
        meta = {}
        for name, t in key_meta(mask).items():
            parts = [torch.empty_like(t) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(parts, t.contiguous(), group=self.group)
            meta[name] = torch.cat(parts, dim=-1)
        return self.inner(q, kv[0], kv[1], retarget(mask, meta))


def apply_context_parallel(model: nn.Module, blocks: str, attention: str, core: str, group, kv: str) -> None:
    """Replace each block's attention core by a RingAttention over `group` (the cp mesh dim)."""
    for block in getattr(model, blocks).values():
        att = block.get_submodule(attention)
        setattr(att, core, RingAttention(getattr(att, core), group, kv))
