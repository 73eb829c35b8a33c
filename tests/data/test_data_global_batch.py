"""The same global batch in every layout: optimizer step k holds the same sequences, in the same
global row order, whatever the split of G = dp_size * grad_accum * batch_size into DP ranks,
accumulation and loader workers; a resume under another split continues exactly."""

import json

import pytest
import torch

from datahelpers import real_tokens
from data import build_loader

G, SEQ = 16, 7   # the tiny corpus (~1.2 k positions) gives ~10 steps per epoch: runs cross an epoch end
SPLITS = [(1, 1, 16), (2, 1, 8), (1, 2, 8), (4, 2, 2)]  # (dp_size, grad_accum, batch_size), all G = 16
STEPS = 13


def loaders(cfg, dp, accum, b, kind="train"):
    return [build_loader(cfg, split=kind, seq_len=SEQ, batch_size=b, dp_rank=r, dp_size=dp, seed=4,
                         grad_accum=accum) for r in range(dp)]


def global_steps(per_rank, accum, steps):
    """Steps as [G, SEQ] (inputs, labels): ranks in order, each rank's micro-batches in order."""
    its = [iter(x) for x in per_rank]
    out = []
    for _ in range(steps):
        parts = [next(it) for it in its for _ in range(accum)]  # rank-major, then micro-batch
        out.append((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])))
    return out


def assert_same(a, b):
    assert len(a) == len(b)
    for k, ((x, y), (x2, y2)) in enumerate(zip(a, b)):
        assert torch.equal(x, x2) and torch.equal(y, y2), f"step {k} differs"


@pytest.fixture
def reference(unique_cfg):
    cfg, ids = unique_cfg
    cfg.num_workers = 0
    ref = global_steps(loaders(cfg, 1, 1, 16), 1, STEPS)
    return cfg, ids, ref


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores: fine here
@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_step_rows_are_the_same_in_every_split(reference, workers):
    cfg, ids, ref = reference
    assert ref[0][0].shape == (G, SEQ)
    epoch = loaders(cfg, 1, 1, 16)[0].batches_per_epoch()
    assert 2 < epoch < STEPS  # the comparison runs into epoch 1
    assert sorted(real_tokens(ref[:epoch])) == ids  # ... after an epoch that holds every token once
    cfg.num_workers = workers
    for dp, accum, b in SPLITS:
        per_rank = loaders(cfg, dp, accum, b)
        got = global_steps(per_rank, accum, STEPS)
        assert got[0][0].shape == (G, SEQ)
        assert_same(got, ref)
        states = [x.state_dict() for x in per_rank]
        assert all(s == states[0] for s in states)  # the same state on every rank


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_worker_without_rows_sends_empty_messages(reference):
    """dp 8 x batch 2: a rank has 2 rows, so with 3 workers the third reads nothing."""
    cfg, _, ref = reference
    cfg.num_workers = 3
    rank = build_loader(cfg, split="train", seq_len=SEQ, batch_size=2, dp_rank=5, dp_size=8, seed=4)
    got = global_steps([rank], 1, STEPS)
    for k, (x, y) in enumerate(got):
        assert torch.equal(x, ref[k][0][10:12]) and torch.equal(y, ref[k][1][10:12]), f"step {k}"


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("before,after", [((2, 1, 8, 0), (1, 1, 16, 0)), ((2, 1, 8, 2), (1, 2, 8, 3)),
                                          ((1, 2, 8, 1), (4, 2, 2, 2)), ((4, 2, 2, 3), (2, 1, 8, 0))])
def test_resume_under_another_split_continues_the_uninterrupted_run(reference, before, after):
    cfg, _, ref = reference
    k = 6  # resume inside epoch 0; the run continues into epoch 1
    dp, accum, b, cfg.num_workers = before
    first = loaders(cfg, dp, accum, b)
    assert_same(global_steps(first, accum, k), ref[:k])
    state = json.loads(json.dumps(first[0].state_dict()))
    dp, accum, b, cfg.num_workers = after
    second = loaders(cfg, dp, accum, b)
    for x in second:
        x.load_state_dict(state)
    assert_same(global_steps(second, accum, STEPS - k), ref[k:])


def test_state_saved_inside_a_step_resumes_only_under_its_split(reference):
    cfg, _, ref = reference
    a = build_loader(cfg, split="train", seq_len=SEQ, batch_size=8, dp_rank=0, dp_size=1, seed=4, grad_accum=2)
    it = iter(a)
    next(it), next(it), next(it)  # step 0 and the first half of step 1
    state = a.state_dict()
    assert (state["steps"], state["micro"]) == (1, 1)
    same = build_loader(cfg, split="train", seq_len=SEQ, batch_size=8, dp_rank=0, dp_size=1, seed=4, grad_accum=2)
    same.load_state_dict(state)
    x, y = next(iter(same))
    assert torch.equal(x, ref[1][0][8:]) and torch.equal(y, ref[1][1][8:])  # the second half of step 1
    other = build_loader(cfg, split="train", seq_len=SEQ, batch_size=16, dp_rank=0, dp_size=1, seed=4)
    with pytest.raises(ValueError, match="inside an optimizer step"):
        other.load_state_dict(state)


def test_validation_steps_are_the_same_in_every_split(unique_cfg):
    cfg, ids = unique_cfg
    cfg.val_urls = list(cfg.urls)
    ref_loader = loaders(cfg, 1, 1, 16, kind="val")[0]
    n = len(ref_loader)
    ref = global_steps([ref_loader], 1, n)
    assert sorted(real_tokens(ref)) == ids  # one pass holds every token once
    for dp, accum, b in SPLITS:
        per_rank = loaders(cfg, dp, accum, b, kind="val")
        assert all(len(x) == n * accum for x in per_rank)  # the same number of val steps
        assert_same(global_steps(per_rank, accum, n), ref)
        assert all(len(list(x)) == n * accum for x in per_rank)  # finite: the pass ends there
