"""The training loss: summed next-token cross-entropy in fp32, computed chunk by chunk.

`F.cross_entropy(logits.float(), ...)` makes an fp32 copy of the whole logits tensor under bf16
and keeps log_softmax's output (another [tokens, vocab] fp32 tensor) alive until backward: at a
128k vocabulary and 8k tokens per micro-batch that is 4 GiB each. Here each block of rows is
upcast, reduced to its log-sum-exp, and dropped; backward recomputes softmax block by block from
the logits (which autograd keeps anyway, in their own dtype) and the saved log-sum-exp (one float
per token). Peak extra memory is one block (`CHUNK_ELEMENTS` fp32 values), whatever the vocabulary.

Numerics: the same fp32 math as F.cross_entropy (log-sum-exp, pick the label, gradient
softmax - one-hot, cast to the logits' dtype); only the order of the sum over tokens can differ,
so losses agree to fp32 rounding (tests/parallel/test_cross_entropy.py).

F.cross_entropy is kept where chunking gains nothing: fp32 logits within one block (no copy to
save; its result is then bit for bit the earlier one) and a DTensor of logits (vocab-parallel
tensor parallel, under torch's loss_parallel, whose sharding rule makes it vocab-parallel).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100   # F.cross_entropy's default; the data loader labels padding with it (data.plan.IGNORE)
# fp32 values per block: 64 MiB, about 128 rows at a 128k vocabulary; a whole micro-batch of a
# small vocabulary is one block (no loop at all)
CHUNK_ELEMENTS = 1 << 24


def _row_blocks(rows: int, vocab: int, chunk_elements: int):
    step = max(1, chunk_elements // max(vocab, 1))
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


class _ChunkedTokenLossSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int) -> torch.Tensor:
        rows, vocab = logits.shape
        labelled = labels != IGNORE_INDEX
        safe = torch.where(labelled, labels, 0)
        lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s, e in _row_blocks(rows, vocab, chunk_elements):
            block = logits[s:e].float()
            lse[s:e] = torch.logsumexp(block, dim=-1)
            picked = block.gather(1, safe[s:e, None]).squeeze(1)
            total += torch.where(labelled[s:e], lse[s:e] - picked, 0.0).sum()
        ctx.save_for_backward(logits, safe, labelled, lse)
        ctx.chunk_elements = chunk_elements
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        logits, safe, labelled, lse = ctx.saved_tensors
        rows, vocab = logits.shape
        grad = torch.empty_like(logits)
        scale = labelled.to(torch.float32) * grad_total.to(torch.float32)   # 0 on ignored rows
        for s, e in _row_blocks(rows, vocab, ctx.chunk_elements):
            p = (logits[s:e].float() - lse[s:e, None]).exp_()               # softmax of the block
            p.scatter_add_(1, safe[s:e, None], torch.full((e - s, 1), -1.0, device=p.device))
            grad[s:e] = p.mul_(scale[s:e, None])
        return grad, None, None


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Sum of the next-token losses of the labelled positions (fp32); 0 when none is labelled.
    logits [..., V], labels [...] (IGNORE_INDEX: not counted)."""
    flat, targets = logits.flatten(0, -2), labels.flatten()
    if isinstance(logits, DTensor) or (logits.dtype == torch.float32 and logits.numel() <= chunk_elements):
        # fp32 logits that fit in one block: no copy to avoid, so F.cross_entropy's own kernel,
        # bit for bit what the engines computed before (tests compare gradients exactly)
        return F.cross_entropy(flat, targets, reduction="sum")
    # autocast off inside: the function does its own fp32 math and must not see ops recast
    with torch.autocast(logits.device.type, enabled=False):
        return _ChunkedTokenLossSum.apply(flat, targets, chunk_elements)
