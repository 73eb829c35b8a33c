"""The training and validation loaders: slots of the epoch stream -> packed (inputs, labels) batches.

See plan.py for how positions are assigned; this file reads them. Shard reading uses webdataset's
tar iterators (shards.py). We do not use webdataset's reservoir `shuffle`: its buffer cannot be
restored without replaying the stream. Instead documents are shuffled in fixed windows of
`shuffle_buffer` documents inside each shard, seeded by (seed, epoch, shard ordinal, window), so
any reader finds the same order at any position.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from . import plan as P
from .shards import iter_documents

log = logging.getLogger("meshformer.data")
STATE_VERSION = 1
WORKER_GROUP = 8  # batches per worker->trainer message


def shard_tokens(entry: dict, *, cfg, tokenizer, seed: int, epoch: int, shuffle: bool, stats: dict):
    """The stream of one planned shard: each document followed by end-of-text, windows shuffled."""
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    window = cfg.shuffle_buffer if shuffle else 0
    docs = iter_documents(entry["url"], mode=entry["mode"], field=entry["field"], tokenizer=tokenizer,
                          on_corrupt=cfg.on_corrupt, stats=stats)
    if window <= 1:
        for ids in docs:
            yield ids
            yield eot
        return
    buf, w = [], 0
    for ids in docs:
        buf.append(ids)
        if len(buf) == window:
            yield from _shuffled(buf, seed, epoch, entry["ordinal"], w, eot)
            buf, w = [], w + 1
    yield from _shuffled(buf, seed, epoch, entry["ordinal"], w, eot)


def _shuffled(buf, seed, epoch, ordinal, w, eot):
    for i in np.random.default_rng([seed, epoch, ordinal, w, 3]).permutation(len(buf)):
        yield buf[i]
        yield eot


def read_positions(plan: list[dict], intervals, **kw):
    """Yield int64 arrays holding exactly the stream positions in `intervals`, in order.

    A shard that turns out shorter than indexed (damaged since) is filled with PAD, so positions
    keep their meaning and resume stays exact.
    """
    starts = [e["start"] for e in plan]
    for a, b in intervals:
        i = int(np.searchsorted(starts, a, side="right")) - 1
        while a < b:
            entry = plan[i]
            s0, s1 = entry["start"], entry["start"] + entry["length"]
            lo, hi = a - s0, min(b, s1) - s0
            pos = 0
            for ids in shard_tokens(entry, **kw):
                n = len(ids)
                if pos + n > lo:
                    piece = ids[max(lo - pos, 0):hi - pos]
                    if len(piece):
                        yield piece.astype(np.int64, copy=False)
                pos += n
                if pos >= hi:
                    break
            if pos < hi:
                log.warning("data shard %s gave %d of its %d indexed tokens; padding the rest",
                            entry["url"], pos, entry["length"])
                yield np.full(hi - max(pos, lo), P.PAD, dtype=np.int64)
            a = s0 + hi
            i += 1


def sequences(pieces, count: int, seq_len: int):
    """Cut a token stream into `count` arrays of seq_len+1 tokens; PAD fills a short stream's end."""
    size = seq_len + 1
    pieces = iter(pieces)
    piece, off = None, 0
    for _ in range(count):
        if piece is not None and off + size <= len(piece):  # fast path: a view, no copy
            yield piece[off:off + size]
            off += size
            continue
        buf = np.empty(size, dtype=np.int64)
        fill = 0
        while fill < size:
            if piece is None or off >= len(piece):
                piece, off = next(pieces, None), 0
                if piece is None:
                    buf[fill:] = P.PAD
                    break
            take = min(size - fill, len(piece) - off)
            buf[fill:fill + take] = piece[off:off + take]
            fill, off = fill + take, off + take
        yield buf


def to_batch(rows: list, eot_id: int):
    x = np.stack(rows).astype(np.int64, copy=False)
    inputs, labels = x[:, :-1].copy(), x[:, 1:].copy()
    if x.min() < 0:  # padding present (ids are never negative)
        inputs[inputs == P.PAD] = eot_id
        labels[labels == P.PAD] = P.IGNORE
    return inputs, labels  # numpy: pickles through worker queues far cheaper than shared-memory tensors


def _as_is(batch):
    return batch


class SlotStream(IterableDataset):
    """Messages (lists of batches) of one rank's slot; worker j plays the role whose turn is j-th."""

    def __init__(self, *, sources, cfg, tokenizer, state: dict, dp_rank: int, seed: int, shuffle: bool,
                 forever: bool):
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.state, self.dp_rank, self.seed = state, dp_rank, seed
        self.shuffle, self.forever = shuffle, forever

    def __iter__(self):
        info = get_worker_info()
        j = info.id if info is not None else 0
        st = self.state
        layout, epoch, remaining, k = st["layout"], st["epoch"], st["remaining"], st["batches"]
        n, group = layout["slots_per_rank"], layout.get("group", 1)
        seq = layout["seq_len"] + 1
        stats: dict = {}
        m = P.phase_batches(remaining, layout)
        role = (j + P.next_message(k, layout, m)) % n  # the DataLoader asks worker 0 first
        while True:
            plan = P.epoch_plan(self.sources, epoch, self.seed, self.shuffle)
            lo, hi = P.slot_bounds(remaining, layout["dp_size"] * n, self.dp_rank * n + role)
            done = P.worker_batches_done(k, role, layout, m)
            count = m - done
            lanes = [sequences(read_positions(plan, P.cut(remaining, min(a + done * seq, b), b), cfg=self.cfg,
                                              tokenizer=self.tokenizer, seed=self.seed, epoch=epoch,
                                              shuffle=self.shuffle, stats=stats), count, layout["seq_len"])
                     for a, b in P.lane_bounds(lo, hi, layout["batch_size"])]
            message = []
            for b in range(done, m):
                message.append(to_batch([next(lane) for lane in lanes], self.tokenizer.eot_id))
                if (b + 1) % group == 0 or b + 1 == m:  # messages end at group and phase boundaries
                    yield message
                    message = []
            if not self.forever:
                return
            epoch, k = epoch + 1, 0
            remaining = [[0, P.plan_total(P.epoch_plan(self.sources, epoch, self.seed, self.shuffle))]]
            m = P.phase_batches(remaining, layout)


class TokenLoader:
    """Endless training stream of one DP rank; `state_dict()` is the same on every rank."""

    def __init__(self, *, sources, cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, stats: dict, fingerprint: str):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len ({seq_len}) and batch_size ({batch_size}) must be >= 1")
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.dp_rank, self.seed, self.stats, self.fingerprint = dp_rank, seed, stats, fingerprint
        self.layout = {"dp_size": dp_size, "slots_per_rank": max(cfg.num_workers, 1), "batch_size": batch_size,
                       "seq_len": seq_len, "group": WORKER_GROUP if cfg.num_workers else 1}
        self._start_epoch(0)

    def _start_epoch(self, epoch: int):
        self.epoch, self.batches, self.anchor = epoch, 0, dict(self.layout)
        self.remaining = [[0, P.plan_total(P.epoch_plan(self.sources, epoch, self.seed, self.cfg.shuffle))]]
        self._phase_len = self.anchor["slots_per_rank"] * P.phase_batches(self.remaining, self.anchor)

    def batches_per_epoch(self) -> int:
        """Batches one rank gets in a full epoch (the current epoch's plan)."""
        full = [[0, P.plan_total(P.epoch_plan(self.sources, self.epoch, self.seed, self.cfg.shuffle))]]
        return self.layout["slots_per_rank"] * P.phase_batches(full, self.layout)

    def __iter__(self):
        state = {"epoch": self.epoch, "remaining": self.remaining, "layout": self.anchor, "batches": self.batches}
        stream = SlotStream(sources=self.sources, cfg=self.cfg, tokenizer=self.tokenizer, state=state,
                            dp_rank=self.dp_rank, seed=self.seed, shuffle=self.cfg.shuffle, forever=True)
        if self.cfg.num_workers == 0:
            batches = iter(stream)
        else:
            batches = iter(DataLoader(stream, batch_size=None, num_workers=self.cfg.num_workers,
                                      prefetch_factor=self.cfg.prefetch, persistent_workers=False,
                                      collate_fn=_as_is))
        for message in batches:
            for inputs, labels in message:
                self.batches += 1
                if self.batches >= self._phase_len:
                    self._start_epoch(self.epoch + 1)
                yield torch.from_numpy(inputs), torch.from_numpy(labels)

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "remaining": [list(r) for r in self.remaining],
                "layout": dict(self.anchor), "batches": self.batches, "seed": self.seed,
                "data": self.fingerprint, "shuffle": self.cfg.shuffle, "shuffle_buffer": self.cfg.shuffle_buffer}

    def load_state_dict(self, d: dict) -> None:
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {d.get('version')!r} unknown (expected {STATE_VERSION})")
        for key, mine in (("seed", self.seed), ("data", self.fingerprint), ("shuffle", self.cfg.shuffle),
                          ("shuffle_buffer", self.cfg.shuffle_buffer)):
            if d[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={d[key]!r} but this run has {mine!r}; "
                                 "resuming exactly needs the same data, seed and data.shuffle settings")
        self.epoch, self.batches = int(d["epoch"]), int(d["batches"])
        self.remaining, self.anchor = [list(map(int, r)) for r in d["remaining"]], dict(d["layout"])
        if not P.same_layout(self.anchor, self.layout):
            # DP size, workers, batch or sequence length changed: keep what is left, cut it anew.
            self.remaining = P.unconsumed(self.remaining, self.anchor, self.batches)
            self.anchor, self.batches = dict(self.layout), 0
            if not self.remaining:
                self._start_epoch(self.epoch + 1)
                return
        self._phase_len = self.anchor["slots_per_rank"] * P.phase_batches(self.remaining, self.anchor)
        if self.batches >= self._phase_len:
            self._start_epoch(self.epoch + 1)


class ValLoader:
    """A finite pass over the validation data, the same batches every time; one slot per DP rank."""

    def __init__(self, *, sources, cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 stats: dict):
        self.sources, self.cfg, self.tokenizer, self.stats = sources, cfg, tokenizer, stats
        self.layout = {"dp_size": dp_size, "slots_per_rank": 1, "batch_size": batch_size, "seq_len": seq_len}
        self.dp_rank = dp_rank
        self.remaining = [[0, P.plan_total(P.epoch_plan(sources, 0, 0, False))]]

    def __len__(self) -> int:
        return P.phase_batches(self.remaining, self.layout)

    def __iter__(self):
        state = {"epoch": 0, "remaining": self.remaining, "layout": self.layout, "batches": 0}
        stream = SlotStream(sources=self.sources, cfg=self.cfg, tokenizer=self.tokenizer, state=state,
                            dp_rank=self.dp_rank, seed=0, shuffle=False, forever=False)
        for message in stream:
            for inputs, labels in message:
                yield torch.from_numpy(inputs), torch.from_numpy(labels)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass
