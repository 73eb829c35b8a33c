"""parallel.cross_entropy: the chunked loss equals F.cross_entropy's (loss and gradient), blocks or not."""
import pytest
import torch
import torch.nn.functional as F

from parallel.cross_entropy import IGNORE_INDEX, token_loss_sum
from parallel.local_engine import cross_entropy

FP32_EPS = torch.finfo(torch.float32).eps


def reference(logits, labels):
    """What the engines computed before: F.cross_entropy on an fp32 copy of the logits."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), reduction="sum")


def case(dtype, rows=3, seq=40, vocab=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, seq, vocab, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vocab, (rows, seq), generator=g)
    labels[0, :7] = IGNORE_INDEX                    # padding at an epoch's end
    labels[2, -1] = IGNORE_INDEX
    return logits, labels


def loss_and_grad(fn, logits, labels):
    leaf = logits.detach().clone().requires_grad_(True)
    loss = fn(leaf, labels)
    (loss * 0.37).backward()                       # an upstream gradient other than 1 (the 1/divisor)
    return loss.detach(), leaf.grad


# chunk_elements 97 * 16: blocks of 16 rows, the last one short (120 rows); 10**9: one block
# (fp32 in one block is F.cross_entropy itself)
@pytest.mark.parametrize("chunk", [97 * 16, 10 ** 9])
def test_fp32_loss_and_gradients_equal_f_cross_entropy_to_rounding(chunk):
    logits, labels = case(torch.float32)
    ours = loss_and_grad(lambda x, y: token_loss_sum(x, y, chunk_elements=chunk), logits, labels)
    ref = loss_and_grad(reference, logits, labels)
    # the same fp32 terms summed in another order: the difference is bounded by n_terms * eps * |sum|
    n = int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours[0], ref[0], rtol=n * FP32_EPS, atol=0)
    # per element: softmax as exp(x - lse) vs exp(x - max) / sum, a few ulps of a value <= 1, and
    # x 0.37 (one more rounding): 8 ulps of 1 absolute, 8 ulps relative
    torch.testing.assert_close(ours[1], ref[1], rtol=8 * FP32_EPS, atol=8 * FP32_EPS)
    assert torch.all(ours[1][0, :7] == 0)          # ignored rows get no gradient


def test_bf16_logits_get_bf16_gradients_within_one_rounding_of_the_fp32_path():
    logits, labels = case(torch.bfloat16)
    ours = loss_and_grad(lambda x, y: token_loss_sum(x, y, chunk_elements=97 * 7), logits, labels)
    ref = loss_and_grad(reference, logits, labels)
    n = int((labels != IGNORE_INDEX).sum())
    torch.testing.assert_close(ours[0], ref[0], rtol=n * FP32_EPS, atol=0)   # fp32 math on the same values
    assert ours[1].dtype == torch.bfloat16
    # both round an fp32 gradient that agrees to a few fp32 ulps to bf16: at most one bf16 ulp apart
    bf16_ulp = torch.finfo(torch.bfloat16).eps
    torch.testing.assert_close(ours[1].float(), ref[1].float(), rtol=bf16_ulp, atol=bf16_ulp * 1e-3)


def test_no_labelled_position_sums_to_zero_and_the_mean_is_nan():
    logits, labels = case(torch.float32)
    labels[:] = IGNORE_INDEX
    loss, grad = loss_and_grad(token_loss_sum, logits, labels)
    assert loss.item() == 0.0 and torch.all(grad == 0)
    assert torch.isnan(cross_entropy(logits, labels))


def test_the_mean_is_the_sum_over_the_labelled_count_bit_for_bit():
    logits, labels = case(torch.float32)
    assert cross_entropy(logits, labels) == token_loss_sum(logits, labels) / (labels != IGNORE_INDEX).sum()


def test_under_autocast_the_loss_is_fp32():
    logits, labels = case(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = token_loss_sum(logits, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, reference(logits, labels), rtol=labels.numel() * FP32_EPS, atol=0)


def test_no_fp32_copy_of_the_logits_is_kept_for_backward():
    logits, labels = case(torch.bfloat16)
    leaf = logits.detach().clone().requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        token_loss_sum(leaf, labels, chunk_elements=97 * 16)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert big and all(t.dtype == torch.bfloat16 for t in big)          # the logits themselves, as they are
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        saved.clear()
        reference(leaf, labels)                                         # what it replaces: an fp32 [N, V] copy
    assert any(t.dtype == torch.float32 and t.numel() == logits.numel() for t in saved)
