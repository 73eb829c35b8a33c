"""The training and validation loaders: global rows of the epoch stream -> (inputs, labels) micro-batches.

See plan.py for how positions are assigned to global rows; this file reads them. A DP rank's rows
are shared among its loader workers (worker w reads the rank's rows j with j % n == w, so each
lane is read by exactly one worker and none reads and discards); each worker sends its part of
the rows for `WORKER_GROUP` steps per message, and the main process stitches the n messages of a
group (torch's DataLoader hands worker messages out round robin, in order) into whole steps.

Shard reading uses webdataset's tar iterators (shards.py). We do not use webdataset's reservoir
`shuffle`: its buffer cannot be restored without replaying the stream. Instead documents are
shuffled in fixed windows of `shuffle_buffer` documents inside each shard, seeded by (seed, epoch,
shard ordinal, window), so any reader finds the same order at any position.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.errors import MeshformerError

from . import plan as P
from .documents import iter_documents

log = logging.getLogger("meshformer.data")
STATE_VERSION = 2  # 1: per-rank slots (loaded by re-cutting what it left, see plan.unconsumed_v1)
WORKER_GROUP = 8  # steps per worker->trainer message (one message per step costs more than making it)


def shard_tokens(entry: dict, *, cfg, tokenizer, seed: int, epoch: int, shuffle: bool, stats: dict):
    """The stream of one planned shard: each document followed by end-of-text, windows shuffled."""
    eot = np.array([tokenizer.eot_id], dtype=np.int64)
    window = cfg.shuffle_buffer if shuffle else 0
    docs = iter_documents(entry["url"], fmt=entry.get("format", "tar"), mode=entry["mode"], field=entry["field"],
                          tokenizer=tokenizer, on_corrupt=cfg.on_corrupt, stats=stats, vocab_size=entry.get("vocab"))
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


def to_batch(x: np.ndarray, eot_id: int):
    """[rows, seq_len+1] tokens -> (inputs, labels) numpy arrays, padding made end-of-text / IGNORE."""
    inputs, labels = x[:, :-1].copy(), x[:, 1:].copy()
    if x.size and x.min() < 0:  # padding present (ids are never negative)
        inputs[inputs == P.PAD] = eot_id
        labels[labels == P.PAD] = P.IGNORE
    return inputs, labels  # numpy: pickles through worker queues far cheaper than shared-memory tensors


def _as_is(batch):
    return batch


class WorkerFailure:
    """A bad-input error met in a loader worker, sent as a message: torch would re-raise it in
    the trainer with the worker's whole stack pasted into the text, and the CLI's one line
    would carry it. The trainer raises the error itself instead."""

    def __init__(self, error: MeshformerError):
        self.error = error


class RowStream(IterableDataset):
    """Messages (lists of per-step (inputs, labels) of this reader's rows) of one DP rank.

    Without workers the main process reads all the rank's rows; with n workers, worker w reads the
    rank's rows w, w+n, w+2n, ... (possibly none: it then sends empty arrays, the same number of
    messages, so the round robin stays aligned). Every reader starts at the state's step and ends
    its messages at the same steps (group and epoch boundaries), so message q of every worker
    covers the same steps.
    """

    def __init__(self, *, sources, cfg, tokenizer, state: dict, rows, readers: int, group: int, seed: int,
                 shuffle: bool, forever: bool):
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.state, self.rows, self.readers, self.group = state, list(rows), readers, group
        self.seed, self.shuffle, self.forever = seed, shuffle, forever

    def __iter__(self):
        if get_worker_info() is None:
            return self._messages()
        return self._messages_or_failure()

    def _messages_or_failure(self):
        try:
            yield from self._messages()
        except MeshformerError as e:
            yield WorkerFailure(e)

    def _messages(self):
        info = get_worker_info()
        mine = self.rows[info.id if info is not None else 0::self.readers]
        st = self.state
        layout, epoch, remaining, k = st["layout"], st["epoch"], st["remaining"], st["steps"]
        seq = layout["seq_len"]
        stats: dict = {}
        while True:
            plan = P.epoch_plan(self.sources, epoch, self.seed, self.shuffle)
            m = P.phase_steps(remaining, layout)
            lanes = [sequences(read_positions(plan, P.unread(remaining, layout, row, k), cfg=self.cfg,
                                              tokenizer=self.tokenizer, seed=self.seed, epoch=epoch,
                                              shuffle=self.shuffle, stats=stats), m - k, seq)
                     for row in mine]
            message = []
            for step in range(k, m):
                x = np.stack([next(lane) for lane in lanes]) if lanes else np.empty((0, seq + 1), np.int64)
                message.append(to_batch(x, self.tokenizer.eot_id))
                if (step + 1 - k) % self.group == 0 or step + 1 == m:  # messages end at group and epoch ends
                    yield message
                    message = []
            if not self.forever:
                return
            epoch, k = epoch + 1, 0
            remaining = [[0, P.plan_total(P.epoch_plan(self.sources, epoch, self.seed, self.shuffle))]]


def stitched_steps(stream: RowStream, num_workers: int, prefetch: int):
    """Whole steps of the rank, (inputs, labels) of all its rows in order, from the stream's readers."""
    if num_workers == 0:
        for message in stream:
            yield from message
        return
    messages = iter(DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=prefetch,
                               persistent_workers=False, collate_fn=_as_is))
    n = num_workers
    while True:
        parts = list(itertools.islice(messages, n))  # one message per worker, worker 0 first
        if not parts:
            return
        failed = next((p for p in parts if isinstance(p, WorkerFailure)), None)
        if failed is not None:
            raise failed.error
        if len(parts) != n or len({len(p) for p in parts}) != 1:
            raise RuntimeError(f"data workers sent misaligned messages ({[len(p) for p in parts]} steps)")
        for step in zip(*parts):
            if n == 1:
                yield step[0]
                continue
            rows = sum(len(x) for x, _ in step)
            inputs = np.empty((rows, step[0][0].shape[1]), np.int64)
            labels = np.empty_like(inputs)
            for w, (x, y) in enumerate(step):  # worker w holds the rank's rows w, w+n, ...
                inputs[w::n], labels[w::n] = x, y
            yield inputs, labels


def micro_batches(inputs: np.ndarray, labels: np.ndarray, grad_accum: int, first: int = 0):
    """A step's micro-batches: a holds the rank's rows a*b .. a*b+b (contiguous views, no copy)."""
    b = len(inputs) // grad_accum
    for a in range(first, grad_accum):
        yield torch.from_numpy(inputs[a * b:(a + 1) * b]), torch.from_numpy(labels[a * b:(a + 1) * b])


def check_shape(*, seq_len: int, batch_size: int, grad_accum: int, dp_rank: int, dp_size: int):
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} must be in [0, dp_size={dp_size})")
    if seq_len < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"seq_len ({seq_len}), batch_size ({batch_size}) and grad_accum ({grad_accum}) must be >= 1")


class TokenLoader:
    """Endless training stream of one DP rank, grad_accum micro-batches per optimizer step;
    `state_dict()` is the same on every rank."""

    def __init__(self, *, sources, cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, stats: dict, fingerprint: str, grad_accum: int = 1):
        check_shape(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size)
        self.sources, self.cfg, self.tokenizer = sources, cfg, tokenizer
        self.dp_rank, self.seed, self.stats, self.fingerprint = dp_rank, seed, stats, fingerprint
        self.grad_accum = grad_accum
        self.dp_accum = {"dp_size": dp_size, "grad_accum": grad_accum}  # how this run divides G
        self.layout = {"global_rows": dp_size * grad_accum * batch_size, "seq_len": seq_len}
        self.rows = P.rank_rows(dp_rank, dp_size, grad_accum, batch_size)
        self._start_epoch(0)

    def _start_epoch(self, epoch: int):
        self.epoch, self.steps, self.micro = epoch, 0, 0
        self.remaining = [[0, P.plan_total(P.epoch_plan(self.sources, epoch, self.seed, self.cfg.shuffle))]]
        self._phase_len = P.phase_steps(self.remaining, self.layout)

    def batches_per_epoch(self) -> int:
        """Micro-batches one rank gets in a full epoch (the current epoch's plan): steps x grad_accum."""
        full = [[0, P.plan_total(P.epoch_plan(self.sources, self.epoch, self.seed, self.cfg.shuffle))]]
        return P.phase_steps(full, self.layout) * self.grad_accum

    def __iter__(self):
        state = {"epoch": self.epoch, "remaining": self.remaining, "layout": self.layout, "steps": self.steps}
        n = self.cfg.num_workers
        stream = RowStream(sources=self.sources, cfg=self.cfg, tokenizer=self.tokenizer, state=state,
                           rows=self.rows, readers=max(n, 1), group=WORKER_GROUP if n else 1, seed=self.seed,
                           shuffle=self.cfg.shuffle, forever=True)
        first = self.micro  # a state saved inside a step: its first micro-batches were handed out
        for inputs, labels in stitched_steps(stream, n, self.cfg.prefetch):
            for batch in micro_batches(inputs, labels, self.grad_accum, first):
                self.micro += 1  # counted when handed out
                if self.micro == self.grad_accum:
                    self.steps, self.micro = self.steps + 1, 0
                    if self.steps >= self._phase_len:
                        self._start_epoch(self.epoch + 1)
                yield batch
            first = 0

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "remaining": [list(r) for r in self.remaining],
                "layout": dict(self.layout), "steps": self.steps, "micro": self.micro, "dp_accum": dict(self.dp_accum),
                "seed": self.seed, "data": self.fingerprint, "shuffle": self.cfg.shuffle,
                "shuffle_buffer": self.cfg.shuffle_buffer}

    def load_state_dict(self, d: dict) -> None:
        version = d.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"data loader state version {version!r} unknown (expected 1 or {STATE_VERSION})")
        for key, mine in (("seed", self.seed), ("data", self.fingerprint), ("shuffle", self.cfg.shuffle),
                          ("shuffle_buffer", self.cfg.shuffle_buffer)):
            if d[key] != mine:
                raise ValueError(f"data loader state was saved with {key}={d[key]!r} but this run has {mine!r}; "
                                 "resuming exactly needs the same data, seed and data.shuffle settings")
        self.epoch = int(d["epoch"])
        remaining = [list(map(int, r)) for r in d["remaining"]]
        if version == 1:  # per-rank slots: keep what they left, cut it into this run's global rows
            self._continue(P.unconsumed_v1(remaining, d["layout"], int(d["batches"])), 0, 0)
            return
        saved, steps, micro = dict(d["layout"]), int(d["steps"]), int(d["micro"])
        if micro and (not P.same_layout(saved, self.layout) or d["dp_accum"] != self.dp_accum):
            raise ValueError(f"data loader state was saved inside an optimizer step ({micro} of its "
                             f"{d['dp_accum']['grad_accum']} micro-batches handed out); resume it with the same "
                             f"dp_size and grad_accum ({d['dp_accum']}) and layout {saved}, or save between steps")
        if P.same_layout(saved, self.layout):
            self._continue(remaining, steps, micro)  # the same global rows: continue exactly
        else:  # another global batch or seq_len: keep what is left, cut it anew
            self._continue(P.unconsumed(remaining, saved, steps), 0, 0)

    def _continue(self, remaining, steps: int, micro: int):
        if not remaining:
            self._start_epoch(self.epoch + 1)
            return
        self.remaining, self.steps, self.micro = remaining, steps, micro
        self._phase_len = P.phase_steps(self.remaining, self.layout)
        if self.steps >= self._phase_len:
            self._start_epoch(self.epoch + 1)


class ValLoader:
    """A finite pass over the validation data, the same micro-batches every time. The val stream is
    cut into the same G global rows as training, so a val step (grad_accum micro-batches per rank)
    holds the same sequences in every layout."""

    def __init__(self, *, sources, cfg, tokenizer, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 stats: dict, grad_accum: int = 1):
        check_shape(seq_len=seq_len, batch_size=batch_size, grad_accum=grad_accum, dp_rank=dp_rank, dp_size=dp_size)
        self.sources, self.cfg, self.tokenizer, self.stats = sources, cfg, tokenizer, stats
        self.grad_accum = grad_accum
        self.layout = {"global_rows": dp_size * grad_accum * batch_size, "seq_len": seq_len}
        self.rows = P.rank_rows(dp_rank, dp_size, grad_accum, batch_size)
        self.remaining = [[0, P.plan_total(P.epoch_plan(sources, 0, 0, False))]]

    def __len__(self) -> int:
        """Micro-batches of one pass on this rank: val steps x grad_accum."""
        return P.phase_steps(self.remaining, self.layout) * self.grad_accum

    def __iter__(self):
        state = {"epoch": 0, "remaining": self.remaining, "layout": self.layout, "steps": 0}
        stream = RowStream(sources=self.sources, cfg=self.cfg, tokenizer=self.tokenizer, state=state, rows=self.rows,
                           readers=1, group=1, seed=0, shuffle=False, forever=False)
        for inputs, labels in stitched_steps(stream, 0, 0):
            yield from micro_batches(inputs, labels, self.grad_accum)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, d: dict) -> None:
        pass
