"""Document + sliding-window masked attention on CPU at seq 1024: SDPA with the explicit mask
(AttnMask.bias, what the model uses) against torch's flex_attention with the same block mask.

    PYTHONPATH=. python bench/masked_attention.py

It prints seconds per forward+backward and per forward. In torch 2.13 flex_attention has no
backward on CPU (NotImplementedError), so training cannot use it there; its compiled forward is
faster than SDPA's (it skips masked blocks), which only inference could use.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from trainer.attention import AttnMask, doc_ids

B, H, T, D, WINDOW, DOCS = 2, 8, 1024, 64, 256, 6


def timed(fn, n: int = 3) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.manual_seed(0)
    tokens = torch.randint(1, 100, (B, T))
    tokens[:, torch.randint(0, T, (DOCS,))] = 0                     # end-of-text id 0: ~DOCS documents per row
    pos, doc = doc_ids(tokens, 0)
    q, k, v = (torch.randn(B, H, T, D, requires_grad=True) for _ in range(3))
    mask = AttnMask(pos, pos, q_doc=doc, k_doc=doc, window=WINDOW)

    block = create_block_mask(lambda b, h, i, j: (i >= j) & (doc[b, i] == doc[b, j]) & (i - j < WINDOW),
                              B, None, T, T, device="cpu")
    # forward first: after a failed backward compile, dynamo leaves flex_attention unfused
    with torch.no_grad():
        fwd = torch.compile(flex_attention)
        qd, kd, vd = (t.detach() for t in (q, k, v))
        print(f"sdpa + explicit mask, forward: "
              f"{timed(lambda: F.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask.bias(q.dtype))):.3f} s")
        print(f"flex_attention (compiled), forward: {timed(lambda: fwd(qd, kd, vd, block_mask=block)):.3f} s")

    def sdpa_step():
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask.bias(q.dtype)).sum().backward()

    print(f"sdpa + explicit mask, forward+backward: {timed(sdpa_step):.3f} s")
    flex = torch.compile(flex_attention)
    try:
        flex(q, k, v, block_mask=block).sum().backward()
        print("flex_attention (compiled), forward+backward: "
              f"{timed(lambda: flex(q, k, v, block_mask=block).sum().backward()):.3f} s")
    except NotImplementedError as e:
        print(f"flex_attention, forward+backward: not available on CPU ({str(e)[:60]}...)")

if __name__ == "__main__":
    main()
