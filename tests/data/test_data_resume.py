"""Exact resume: same next batches after a restart; no repeat or skip after the global batch changes
(the same global batch under another split is test_data_global_batch.py)."""

import json
from collections import Counter

import pytest
import torch

from datahelpers import real_tokens, take
from data import build_loader
from data import plan as P
from data.loader import read_positions


def loader_for(cfg, r=0, d=1, seed=3, seq_len=6, batch_size=2):
    return build_loader(cfg, split="train", seq_len=seq_len, batch_size=batch_size, dp_rank=r, dp_size=d, seed=seed)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 3 workers on 2 cores: fine here
@pytest.mark.parametrize("workers,back", [(0, 3), (2, 3), (2, 13), (3, 29)])
def test_resume_gives_the_same_next_batches(unique_cfg, workers, back):
    cfg, _ = unique_cfg
    cfg.num_workers = workers
    steps = loader_for(cfg, r=1, d=2).batches_per_epoch()
    k, more = steps - back, back + 4  # resume inside epoch 0 and run into epoch 1
    straight = take(loader_for(cfg, r=1, d=2), k + more)
    first = loader_for(cfg, r=1, d=2)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain, JSON-serialisable values
    resumed = loader_for(cfg, r=1, d=2)
    resumed.load_state_dict(state)
    after = take(resumed, more)
    for (x, y), (x2, y2) in zip(straight[k:], after):
        assert torch.equal(x, x2) and torch.equal(y, y2)
    assert resumed.state_dict()["epoch"] == 1


def test_state_is_the_same_on_every_dp_rank(unique_cfg):
    cfg, _ = unique_cfg
    states = []
    for r in range(3):
        loader = loader_for(cfg, r=r, d=3)
        take(loader, 4)
        states.append(loader.state_dict())
    assert states[0] == states[1] == states[2]


def consume_epoch_with_resize(cfg, d1, n1, d2, n2, k):
    """d1 ranks (n1 workers) take k batches each; then d2 ranks (n2 workers) finish the epoch."""
    seen, states = [], []
    cfg.num_workers = n1
    for r in range(d1):
        loader = loader_for(cfg, r=r, d=d1)
        seen += real_tokens(take(loader, k))
        states.append(loader.state_dict())
    assert all(s == states[0] for s in states)
    cfg.num_workers = n2
    for r in range(d2):
        loader = loader_for(cfg, r=r, d=d2)
        loader.load_state_dict(states[0])
        batches = []
        for b in loader:
            batches.append(b)
            if loader.state_dict()["epoch"] == 1:
                break
        seen += real_tokens(batches)
    return Counter(seen)


@pytest.mark.parametrize("d1,n1,d2,n2,k", [(4, 1, 2, 1, 3), (2, 1, 4, 1, 5), (2, 2, 3, 1, 3), (4, 1, 2, 2, 1)])
def test_resize_neither_repeats_nor_skips(unique_cfg, d1, n1, d2, n2, k):
    cfg, ids = unique_cfg
    seen = consume_epoch_with_resize(cfg, d1, n1, d2, n2, k)
    assert sorted(seen) == ids, f"skipped {len(set(ids) - set(seen))} tokens"
    assert max(seen.values()) == 1, "a token was repeated"


def test_changed_batch_shape_also_resumes_without_loss(unique_cfg):
    cfg, ids = unique_cfg
    first = loader_for(cfg, d=1, seq_len=6, batch_size=2)
    seen = real_tokens(take(first, 5))
    second = loader_for(cfg, d=1, seq_len=11, batch_size=3)
    second.load_state_dict(first.state_dict())
    for b in second:
        seen += real_tokens([b])
        if second.state_dict()["epoch"] == 1:
            break
    assert sorted(seen) == ids


def test_state_from_other_data_or_seed_is_refused(unique_cfg):
    cfg, _ = unique_cfg
    a = loader_for(cfg, seed=1)
    take(a, 2)
    with pytest.raises(ValueError, match="seed"):
        loader_for(cfg, seed=2).load_state_dict(a.state_dict())
    state = a.state_dict()
    state["data"] = "something-else"
    with pytest.raises(ValueError, match="data"):
        loader_for(cfg, seed=1).load_state_dict(state)


@pytest.mark.parametrize("n,group", [(1, 1), (2, 1), (2, 8), (3, 4)])
def test_version_1_worker_bookkeeping_matches_round_robin_messages(n, group):
    """Version 1 states (per-rank slots) are still loaded, by re-cutting what they left; that needs
    which worker served which batch. Simulate torch's DataLoader: messages round robin over workers,
    each worker's batches cut at multiples of `group` and at the phase end; the closed form must
    agree at every k."""
    for m in (1, 5, 8, 13, 16):
        layout = {"slots_per_rank": n, "group": group}
        order = []  # worker of each batch of the rank, in the order the trainer got them
        messages = {w: [min(group, m - s) for s in range(0, m, group)] for w in range(n)}
        for q in range(len(messages[0])):
            for w in range(n):
                order += [w] * messages[w][q]
        for k in range(len(order) + 1):
            for w in range(n):
                assert P.worker_batches_done(k, w, layout, m) == order[:k].count(w)


def test_version_1_state_resumes_without_repeat_or_skip(unique_cfg):
    """A state saved before global rows (per-rank slots) resumes by cutting what it left anew."""
    cfg, ids = unique_cfg
    fresh = loader_for(cfg)
    end = fresh.remaining[0][1]
    v1 = {k: v for k, v in fresh.state_dict().items() if k in ("seed", "data", "shuffle", "shuffle_buffer")}
    v1.update(version=1, epoch=0, remaining=[[0, end]], batches=5,
              layout={"dp_size": 2, "slots_per_rank": 2, "batch_size": 2, "seq_len": 6, "group": 8})
    left = P.unconsumed_v1(v1["remaining"], v1["layout"], 5)
    done = P.merge([[a, b] for a, b in zip([0] + [e for _, e in left], [s for s, _ in left] + [end])])
    assert done and left  # the v1 run had consumed part of the epoch
    plan = P.epoch_plan(fresh.sources, 0, 3, cfg.shuffle)
    pieces = read_positions(plan, done, cfg=cfg, tokenizer=fresh.tokenizer, seed=3, epoch=0, shuffle=cfg.shuffle,
                            stats={})
    seen = [t for piece in pieces for t in piece.tolist() if t > 0]  # what the v1 run trained on (0: EOT)
    resumed = loader_for(cfg, batch_size=3)
    resumed.load_state_dict(json.loads(json.dumps(v1)))
    for b in resumed:
        seen += real_tokens([b])
        if resumed.state_dict()["epoch"] == 1:
            break
    assert sorted(seen) == ids


def test_unknown_state_version_is_refused(unique_cfg):
    cfg, _ = unique_cfg
    state = loader_for(cfg).state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        loader_for(cfg).load_state_dict(state)
