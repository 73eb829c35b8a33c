"""Context parallel's pieces without processes (the ring itself runs in test_parity.py's cp rows):
the zigzag chunks cover each position once, and a rank's blocks (skipping keys in its queries'
future, tiled queries recomputed in backward) merge to full attention, values and gradients."""
from __future__ import annotations

import pytest
import torch

from core.errors import ConfigError
from core.layout import validate_layout
from core.model_config import ModelConfig
from core.parallel_config import ParallelConfig
from parallel import context
from parallel.context import RingAttention, merge, zigzag_index
from trainer.attention import AttentionCore, AttnMask, doc_ids
from trainer.model import alibi_slopes


def test_zigzag_chunks_cover_the_sequence_evenly():
    for cp in (1, 2, 4):
        idx = [zigzag_index(32, cp, r) for r in range(cp)]
        assert sorted(torch.cat(idx).tolist()) == list(range(32))
        # causal work of a rank ~ the sum of its positions: equal on every rank (no rank idles)
        assert len({int(i.sum()) for i in idx}) == 1


@pytest.mark.parametrize("kind", ["causal", "alibi", "doc_window"])
def test_a_ranks_blocks_merge_to_full_attention(kind, monkeypatch):
    """Each rank of cp = 2 at T = 24, its blocks in the order the ring brings them: the outputs
    and the gradients of q, k, v are full attention's. doc_window: packed documents (positions
    restart per document, ids travel with the keys) and a sliding window. float64, the same maths
    in another order: 1e-10 is far above its rounding (~1e-15) and far below any masking error."""
    monkeypatch.setattr(context, "QUERY_TILE", 5)   # several tiles, one of them partial
    t, cp, core = 24, 2, AttentionCore(None)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, t, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, t, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    s = alibi_slopes(4).double() if kind == "alibi" else None
    pos, doc, window = torch.arange(t), None, None
    if kind == "doc_window":
        tokens = torch.randint(1, 9, (2, t), generator=g)
        tokens[0, [3, 10, 17]] = tokens[1, [13]] = 0          # end-of-text id 0
        (pos, doc), window = doc_ids(tokens, 0), 6

    def mask(qi, ki):
        return AttnMask(pos[..., qi], pos[..., ki], s, q_doc=None if doc is None else doc[:, qi],
                        k_doc=None if doc is None else doc[:, ki], window=window)
    everything = torch.arange(t)
    full = core(q, k, v, mask(everything, everything))
    want = torch.autograd.grad(full.pow(2).sum(), (q, k, v))
    ring = RingAttention(core, group=None)
    loss = 0
    for rank in range(cp):
        mine = zigzag_index(t, cp, rank)
        blocks = []
        for step in range(cp):
            other = zigzag_index(t, cp, (rank - step) % cp)
            kv = torch.stack([k.index_select(2, other), v.index_select(2, other)])
            blocks.append(ring.partial(q.index_select(2, mine), kv, mask(mine, other), mine, other))
        out = merge(blocks, q.dtype)
        assert (out - full.index_select(2, mine)).abs().max().item() < 1e-10
        loss = loss + out.pow(2).sum()
    # gradients of the sum over ranks of their rows' loss: the full loss's
    got = torch.autograd.grad(loss, (q, k, v))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and (a - b).abs().max().item() < 1e-10


def test_block_of_unseen_keys_has_finite_gradients():
    """A query that sees no key of a block (lse -inf) adds nothing and gets no NaN gradient."""
    core = AttentionCore(None)
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 4, 8, dtype=torch.float64, requires_grad=True)
    o, lse = core.block(q, k, k, AttnMask(torch.arange(4), torch.arange(2, 6)))   # rows 0, 1 see nothing
    assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()
    (o.sum() + lse[..., 2:].sum()).backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_layout_checks():
    model = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64)
    with pytest.raises(ConfigError, match="parallel.cp: 2 cuts train.seq_len = 30"):
        validate_layout(ParallelConfig(cp=2), model, 8, 30)
    with pytest.raises(ConfigError, match="parallel.cp: context parallel with pipeline"):
        validate_layout(ParallelConfig(cp=2, pp=2), model, 8, 32)
    validate_layout(ParallelConfig(cp=2, tp=2), model, 8, 32)
