"""Who reads which tokens: the epoch order and its split into slots, as pure functions of small state.

An epoch is a deterministic order of shards (seeded per epoch; several sources interleaved by
weight). Laid end to end, with an end-of-text token after each document, its documents form one
token stream; a *position* is an offset in that stream. The positions not yet trained on are a
list of intervals, `remaining`. They are cut into `dp_size * slots_per_rank` equal contiguous
slots (rank-major: slot = dp_rank * slots_per_rank + worker). A slot is cut again into
batch_size equal contiguous lanes; row i of the slot's batches reads lane i, seq_len+1 tokens at a
time, so the rows of a batch come from distant documents (often other shards). Workers send `group` batches per message (one
message per batch costs more than making it) and torch's DataLoader takes messages round robin,
so worker w of a rank serves that rank's batch groups w, w+n, w+2n, ...

All DP ranks consume batches in lockstep, so the global state is (epoch, remaining, layout,
batches consumed per rank): the same on every rank. From it any new layout (other DP size,
worker count, batch size) can compute what was consumed and cut the rest anew: nothing repeated,
nothing skipped, down to the token. Slots of one phase all give the same number of batches; the
end of each lane is padded (inputs end-of-text, labels -100, the ignore index).
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np

from .shards import shard_name

PAD = -1  # position with no token: input becomes end-of-text, label becomes IGNORE
IGNORE = -100


def epoch_plan(sources, epoch: int, seed: int, shuffle: bool) -> list[dict]:
    """The shards of one epoch in reading order, each with its stream length and ordinal."""
    lists = []
    for si, src in enumerate(sources):
        rng = np.random.default_rng([seed, epoch, si, 7])
        shards = [s for s in src.shards if s["tokens"] + s["docs"] > 0]
        if not shards or src.weight <= 0:
            continue
        if len(sources) == 1:
            order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
            lists.append([shards[i] for i in order])
            continue
        # Mixing: source i brings about weight_i / sum(weights) of the epoch's tokens, cycling
        # through (reshuffled) passes of its shards when up-sampled.
        total = sum(s.tokens for s in sources if s.weight > 0)
        target = src.weight / sum(s.weight for s in sources if s.weight > 0) * total
        picked, got = [], 0
        while got < target or not picked:
            order = rng.permutation(len(shards)) if shuffle else np.arange(len(shards))
            for i in order:
                if got >= target and picked:
                    break
                picked.append(shards[i])
                got += shards[i]["tokens"] + shards[i]["docs"]
        lists.append(picked)
    if len(lists) == 1:
        merged = lists[0]
    else:  # interleave sources evenly through the epoch (stratified random keys)
        rng = np.random.default_rng([seed, epoch, 11])
        keyed = []
        for li, lst in enumerate(lists):
            jitter = rng.random(len(lst)) if shuffle else np.full(len(lst), 0.5)
            keyed += [((j + jitter[j]) / len(lst), li, j, s) for j, s in enumerate(lst)]
        merged = [k[3] for k in sorted(keyed, key=lambda k: k[:3])]
    plan, start = [], 0
    for ordinal, s in enumerate(merged):
        length = s["tokens"] + s["docs"]
        plan.append(dict(s, start=start, length=length, ordinal=ordinal))
        start += length
    return plan


def plan_total(plan: list[dict]) -> int:
    return plan[-1]["start"] + plan[-1]["length"] if plan else 0


def data_fingerprint(sources) -> str:
    """Identifies the indexed data, so a state is not applied to other data by mistake."""
    text = json.dumps([[s.weight, [[shard_name(x["url"]), x["docs"], x["tokens"]] for x in s.shards]]
                       for s in sources])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def total(remaining) -> int:
    return sum(b - a for a, b in remaining)


def cut(remaining, lo: int, hi: int) -> list[list[int]]:
    """Positions lo..hi (counted within the remaining intervals) as stream intervals."""
    out, seen = [], 0
    for a, b in remaining:
        n = b - a
        s, e = max(lo - seen, 0), min(hi - seen, n)
        if s < e:
            out.append([a + s, a + e])
        seen += n
        if seen >= hi:
            break
    return out


def slot_bounds(remaining, slots: int, slot: int) -> tuple[int, int]:
    r = total(remaining)
    return slot * r // slots, (slot + 1) * r // slots


def lane_bounds(lo: int, hi: int, batch_size: int) -> list[tuple[int, int]]:
    """A slot's lanes: row i of every batch of a slot reads lane i, its i-th contiguous part."""
    n = hi - lo
    return [(lo + i * n // batch_size, lo + (i + 1) * n // batch_size) for i in range(batch_size)]


def phase_batches(remaining, layout: dict) -> int:
    """Batches each slot (and each worker) gives before the epoch ends."""
    slots = layout["dp_size"] * layout["slots_per_rank"]
    longest_lane = math.ceil(math.ceil(total(remaining) / slots) / layout["batch_size"])
    return math.ceil(longest_lane / (layout["seq_len"] + 1))


def _group_shape(layout: dict, m: int) -> tuple[int, int, int, int]:
    """(n, G, Q, r): workers, batches per message, messages per worker per phase, last message's size."""
    n, g = layout["slots_per_rank"], layout.get("group", 1)
    q = max(1, math.ceil(m / g))
    return n, g, q, m - g * (q - 1)


def worker_batches_done(k: int, worker: int, layout: dict, m: int) -> int:
    """How many of a rank's first k batches of a phase (m batches per worker) worker `worker` served.

    Workers send messages of `group` batches (the last of a phase shorter, r), and torch's
    DataLoader takes messages round robin: message g of the phase comes from worker g % n.
    """
    n, g, q, r = _group_shape(layout, m)
    full = n * g * (q - 1)
    if k <= full:
        cycles, rem = divmod(k, g * n)
        return cycles * g + min(max(rem - worker * g, 0), g)
    return (q - 1) * g + min(max(k - full - worker * r, 0), r)


def next_message(k: int, layout: dict, m: int) -> int:
    """Index in the phase of the message that holds the rank's batch k."""
    n, g, q, r = _group_shape(layout, m)
    full = n * g * (q - 1)
    return k // g if k < full else n * (q - 1) + (k - full) // r


def merge(intervals) -> list[list[int]]:
    out: list[list[int]] = []
    for a, b in sorted(intervals):
        if a >= b:
            continue
        if out and out[-1][1] >= a:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def unconsumed(remaining, layout: dict, k: int) -> list[list[int]]:
    """The remaining intervals after every rank consumed k batches under `layout`."""
    n = layout["slots_per_rank"]
    slots = layout["dp_size"] * n
    seq = layout["seq_len"] + 1
    m = phase_batches(remaining, layout)
    left = []
    for s in range(slots):
        done = worker_batches_done(k, s % n, layout, m)
        for lo, hi in lane_bounds(*slot_bounds(remaining, slots, s), layout["batch_size"]):
            left += cut(remaining, min(lo + done * seq, hi), hi)
    return merge(left)


def same_layout(a: dict, b: dict) -> bool:
    keys = ("dp_size", "slots_per_rank", "batch_size", "seq_len", "group")
    return all(a.get(k, 1) == b.get(k, 1) for k in keys)
