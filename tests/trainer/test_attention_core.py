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


def test_explicit_bf16_attention_matches_float64():
    """The CPU bf16 path (two batched GEMMs around a softmax, used up to CPU_BF16_EXPLICIT_MAX_KEYS
    keys) against float64 SDPA on the same bf16-rounded operands, causal and with a bias (ALiBi and a
    window), GQA: output and the three input gradients. Tolerance: the path rounds three times in
    bf16 (scores, probabilities, output; unit roundoff 2^-8), each a relative error on terms whose
    sums stay within the largest value, so 4 ulps of the largest reference value covers them with
    margin; a wrong mask or a wrong query-to-key head mapping errs by O(that value). torch's own bf16
    SDPA meets the same bound (checked too, so the bound is bf16's, not this path's)."""
    import torch.nn.functional as F
    from trainer.attention import explicit_attention, use_explicit
    g = torch.Generator().manual_seed(0)
    b, h, hkv, t, d = 2, 4, 2, 40, 16
    q, k, v = (torch.randn(b, n, t, d, generator=g).bfloat16() for n in (h, hkv, hkv))
    grad_out = torch.randn(b, h, t, d, generator=g).bfloat16()
    pos = torch.arange(t)
    assert use_explicit(q, k) and not use_explicit(q.float(), k.float())
    sdpa = lambda q, k, v, bias: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,  # noqa: E731
                                                                 enable_gqa=True)
    explicit = lambda q, k, v, bias: explicit_attention(q, k, v, bias, None)  # noqa: E731
    for mask in (AttnMask(pos, pos, aligned=True), AttnMask(pos, pos, alibi_slopes(h), window=9)):
        def run(fn, dtype):
            leaves = [x.detach().to(dtype).clone().requires_grad_() for x in (q, k, v)]
            out = fn(*leaves, mask.bias(dtype))
            out.backward(grad_out.to(dtype))
            return [out.double()] + [x.grad.double() for x in leaves]
        ref = run(sdpa, torch.float64)
        for got in (run(explicit, torch.bfloat16), run(sdpa, torch.bfloat16)):
            for name, r, x in zip(("out", "dq", "dk", "dv"), ref, got):
                assert (x - r).abs().max().item() <= 4 * 2 ** -8 * r.abs().max().item(), name


def test_explicit_path_only_for_short_bf16_on_cpu():
    from trainer.attention import CPU_BF16_EXPLICIT_MAX_KEYS, use_explicit
    q = torch.zeros(1, 2, 4, 8, dtype=torch.bfloat16)
    short = torch.zeros(1, 2, CPU_BF16_EXPLICIT_MAX_KEYS, 8, dtype=torch.bfloat16)
    long = torch.zeros(1, 2, CPU_BF16_EXPLICIT_MAX_KEYS + 1, 8, dtype=torch.bfloat16)
    assert use_explicit(q, short) and not use_explicit(q, long)
    assert not use_explicit(q.float(), short.float())     # fp32 keeps SDPA: its results do not move
