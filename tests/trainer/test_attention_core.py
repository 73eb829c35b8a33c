"""The attention seam (trainer/attention.py): the mask described by positions gives the model's
attention, and attention computed block by block over the keys and merged by log-sum-exp (what a
context-parallel ring does) equals attention over all keys at once."""
from __future__ import annotations

import torch

from core.model_config import ModelConfig
from trainer.attention import AttentionCore, AttnMask
from trainer.model import Transformer, alibi_slopes


def qkv(b=2, h=4, hkv=2, t=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64),
            torch.randn(b, hkv, t, d, generator=g, dtype=torch.float64))


def merged(core, q, k, v, mask, cuts):
    """Attention over key blocks [cuts[i], cuts[i+1]) merged by their log-sum-exps."""
    outs, lses = [], []
    for lo, hi in zip(cuts, cuts[1:]):
        o, lse = core.block(q, k[:, :, lo:hi], v[:, :, lo:hi], mask.keys(mask.k_pos[lo:hi]))
        outs.append(o)
        lses.append(lse)
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    return sum(o * torch.exp(l - lse)[..., None] for o, l in zip(outs, lses))


def test_blocks_merge_to_full_attention():
    # float64: both sides are the same maths in another order; 1e-12 is ~1e4 ulps of headroom
    q, k, v = qkv()
    pos = torch.arange(12)
    core = AttentionCore(None)
    for slopes in (None, alibi_slopes(4).double()):
        mask = AttnMask(pos, pos, slopes, aligned=slopes is None)
        full = core(q, k, v, mask)
        got = merged(core, q, k, v, mask, [0, 5, 9, 12])
        assert (got - full).abs().max().item() < 1e-12


def test_positions_argument_is_the_default_sequence():
    """forward(tokens, positions=arange) equals forward(tokens) for every position kind, and a
    permuted sequence with its positions gives the same logits permuted (what a context-parallel
    rank's zigzag chunks rely on): what a token sees follows its position, not its place in memory."""
    for position in ("rope", "learned", "sinusoidal", "alibi"):
        cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden=64,
                          max_seq_len=32, position=position)
        torch.manual_seed(0)
        m = Transformer(cfg).double().eval()
        tokens = torch.randint(0, 64, (2, 16))
        with torch.no_grad():
            ref = m(tokens)
            same = m(tokens, positions=torch.arange(16))
            perm = torch.randperm(16)
            shuffled = m(tokens[:, perm], positions=perm)
        assert (same - ref).abs().max().item() < 1e-12, position
        assert (shuffled - ref[:, perm]).abs().max().item() < 1e-10, position
