"""The engine's loss: the sum of token losses over the global batch divided by its labelled tokens
(parallel/local_engine.py). A micro-batch whose labels are all ignored (an epoch's padded end)
adds 0 instead of NaN, micro-batches weigh by their labelled tokens, and a global batch without
a label leaves weights and optimizer state untouched. Layouts (DP, TP, PP) are checked against
the same normalisation on a padded epoch end in test_parity.py."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import data
from parallel.local_engine import IGNORE_INDEX, LocalEngine

V, T = 11, 6


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, x):
        return self.head(torch.tanh(self.emb(x)))


def make_engine(model, weight_decay=0.0):
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=weight_decay)
    return LocalEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), torch.device("cpu"))


def batch(rows, labelled, seed):
    """(inputs, labels) of `rows` rows; only the first `labelled` positions (row-major) labelled."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randint(0, V, (rows, T), generator=g), torch.randint(0, V, (rows, T), generator=g)
    y.view(-1)[labelled:] = IGNORE_INDEX
    return x, y


def reference(model, batches):
    """Loss and gradients of the mean over the labelled tokens of all batches together."""
    ref = copy.deepcopy(model)
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    loss = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    loss.backward()
    return loss.detach(), [p.grad for p in ref.parameters()]


def test_the_engine_ignores_the_loaders_padding_label():
    assert IGNORE_INDEX == data.IGNORE


def test_a_micro_batch_without_labels_adds_nothing():
    torch.manual_seed(0)
    model = Tiny()
    empty, full = batch(2, 0, seed=1), batch(2, 7, seed=2)
    want, grads = reference(model, [full])
    engine = make_engine(model)
    # Evaluation: the fp32 sum over the same count, divided in fp64 (one fp32 rounding apart).
    assert engine.eval_loss([empty, full]) == pytest.approx(want.item(), rel=1e-7)
    out = engine.train_step([empty, full])
    assert not out.unlabelled and not out.skipped
    # Exact: the empty micro-batch adds 0 and 0 gradients; the other one's sum / its count is
    # the mean that F.cross_entropy computes (the same sum over the same count).
    assert torch.equal(out.loss, want)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))


def test_micro_batches_weigh_by_their_labelled_tokens():
    """Two micro-batches with 3 and 11 labels: the loss is the mean over the 14 tokens (a mean of
    the two micro-batch means would weigh each of the 3 tokens almost 4x)."""
    torch.manual_seed(0)
    model = Tiny()
    batches = [batch(2, 3, seed=3), batch(2, 11, seed=4)]
    want, grads = reference(model, batches)
    engine = make_engine(model)
    out = engine.train_step(batches)
    # The same 14 terms summed in another grouping (3 + 11): a few fp32 ulps (6e-8 each) apart.
    assert torch.allclose(out.loss, want, rtol=1e-6, atol=0)
    # Gradients: each is a sum over the 14 tokens' backward products, accumulated in two backward
    # passes instead of one and scaled before rather than after: ~14 roundings of 6e-8 relative to
    # the largest term, i.e. < 1e-6 of it; rtol 1e-5 leaves 10x, atol 1e-7 covers entries that cancel
    # to near 0 (the largest gradient entries here are 0.03-0.16; measured gap 1.5e-8).
    assert all(torch.allclose(p.grad, g, rtol=1e-5, atol=1e-7) for p, g in zip(model.parameters(), grads))
    means = sum(F.cross_entropy(copy.deepcopy(model)(x).flatten(0, 1), y.flatten()) for x, y in batches) / 2
    assert not torch.allclose(out.loss, means, rtol=1e-3)   # the old normalisation differs here


def test_a_global_batch_without_labels_changes_nothing():
    torch.manual_seed(0)
    model = Tiny()
    engine = make_engine(model, weight_decay=0.1)
    engine.train_step([batch(2, 9, seed=5)])          # AdamW's moments are non-zero from here
    weights = copy.deepcopy(model.state_dict())
    state = copy.deepcopy(engine.optimizer.state_dict())
    out = engine.train_step([batch(2, 0, seed=6), batch(2, 0, seed=7)])
    assert out.unlabelled and not out.skipped
    assert out.loss.item() == 0.0 and out.grad_norm.item() == 0.0   # finite: not a divergence
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    after = engine.optimizer.state_dict()["state"]
    assert all(torch.equal(v, state["state"][i][k]) for i, s in after.items() for k, v in s.items())
    assert engine.scheduler.last_epoch == 2                           # the LR schedule counts the step
    assert engine.eval_loss([batch(2, 0, seed=6)]) == 0.0             # no token: 0, not NaN
