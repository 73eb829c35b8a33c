"""An epoch across DP ranks x loader workers covers every document exactly once."""

from collections import Counter

import torch

from datahelpers import real_tokens, slot_stream, take, text_docs, write_text_shards
from data import DataConfig, build_loader, build_tokenizer
from data.loader import WORKER_GROUP


def epoch_batches(cfg, dp_size, **kw):
    """Every rank's batches of epoch 0 (the loader's state says when the epoch ended)."""
    out = []
    for r in range(dp_size):
        loader = build_loader(cfg, split="train", dp_rank=r, dp_size=dp_size, seed=5, **kw)
        batches = []
        for b in loader:
            batches.append(b)
            if loader.state_dict()["epoch"] == 1:
                break
        out.append(batches)
    return out


def test_unique_tokens_once_across_2_ranks_2_workers(unique_cfg):
    cfg, ids = unique_cfg
    cfg.num_workers = 2
    per_rank = epoch_batches(cfg, 2, seq_len=7, batch_size=3)
    assert len(per_rank[0]) == len(per_rank[1]) > 2  # lockstep: every rank gets the same count
    seen = Counter(t for batches in per_rank for t in real_tokens(batches))
    assert sorted(seen) == ids, "some token was skipped or invented"
    assert max(seen.values()) == 1, "some token was repeated"
    for batches in per_rank:
        for x, y in batches:
            assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (3, 7)
            real = y[:, :-1] != -100
            assert torch.equal(x[:, 1:][real], y[:, :-1][real])  # labels are inputs shifted by one


def test_text_documents_once_across_2_ranks_2_workers(tmp_path):
    docs = text_docs(90, seed=1)
    cfg = DataConfig(urls=write_text_shards(tmp_path / "s", docs, per_shard=6), cache_dir=str(tmp_path / "c"),
                     num_workers=2, shuffle_buffer=3)
    eot = build_tokenizer(cfg).eot_id
    per_rank = epoch_batches(cfg, 2, seq_len=31, batch_size=2)
    # The epoch's stream is cut into G = 4 contiguous lanes, one per global row; rank 0 holds rows
    # 0-1 and rank 1 rows 2-3, whichever worker read them. Joined in row order they give the whole
    # epoch's stream. (Each of the 2 workers of a rank reads one row here: the stitching is tested.)
    assert len(per_rank[0]) == len(per_rank[1]) > WORKER_GROUP  # several messages per worker
    stream = slot_stream(per_rank[0], eot) + slot_stream(per_rank[1], eot)
    texts, cur = [], []
    for t in stream:
        if t == eot:
            texts.append(bytes(cur).decode())
            cur = []
        else:
            cur.append(t)
    assert not cur, "the epoch stream must end with an end-of-text"
    assert sorted(texts) == sorted(docs)


def test_epochs_differ_in_order_but_not_content(unique_cfg):
    cfg, ids = unique_cfg
    loader = build_loader(cfg, split="train", seq_len=9, batch_size=2, dp_rank=0, dp_size=1, seed=1)
    epochs = {0: [], 1: []}
    epoch = 0
    for b in loader:
        epochs[epoch].append(b)
        epoch = loader.state_dict()["epoch"]  # the epoch the next batch belongs to
        if epoch == 2:
            break
    per_epoch = [real_tokens(v) for v in epochs.values()]
    assert sorted(per_epoch[0]) == ids
    assert per_epoch[0] != per_epoch[1]


def test_val_is_finite_same_each_time_and_split_by_rank(unique_cfg):
    cfg, ids = unique_cfg
    cfg.val_urls = list(cfg.urls)
    vals = [build_loader(cfg, split="val", seq_len=8, batch_size=2, dp_rank=r, dp_size=2, seed=0) for r in range(2)]
    first, again = list(vals[0]), list(vals[0])
    assert len(first) == len(vals[0]) and all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    both = real_tokens(first) + real_tokens(list(vals[1]))
    assert sorted(both) == ids


def test_no_validation_without_val_urls(unique_cfg):
    cfg, _ = unique_cfg
    assert build_loader(cfg, split="val", seq_len=8, batch_size=2, dp_rank=0, dp_size=1, seed=0) is None


def test_workers_prefetch_does_not_move_state(unique_cfg):
    cfg, _ = unique_cfg
    cfg.num_workers = 2
    loader = build_loader(cfg, split="train", seq_len=5, batch_size=2, dp_rank=0, dp_size=1, seed=0)
    take(loader, 3)
    assert loader.state_dict()["steps"] == 3


def test_rows_of_a_batch_come_from_distant_lanes(unique_cfg):
    cfg, ids = unique_cfg
    cfg.shuffle = False  # shard and document order as written: lane i holds smaller ids than lane i+1
    loader = build_loader(cfg, split="train", seq_len=5, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    x, _ = take(loader, 1)[0]
    firsts = [max(row) for row in x.tolist()]
    lane = len(ids) // 4
    assert all(b - a >= lane - 12 for a, b in zip(firsts, firsts[1:])), firsts  # ~a quarter of the epoch apart
