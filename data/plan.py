"""Who reads which tokens: the epoch order and its cut into global rows, as pure functions of small state.

An epoch is a deterministic order of shards (seeded per epoch; several sources interleaved by
weight). Laid end to end, with an end-of-text token after each document, its documents form one
token stream; a *position* is an offset in that stream. The positions not yet trained on are a
list of intervals, `remaining`. They are cut into G equal contiguous *lanes*, G = the global batch
in sequences (dp_size * grad_accum * batch_size): row r of every optimizer step reads lane r,
seq_len+1 tokens at a time, so the rows of a step come from distant documents (often other shards)
and row r of the next step continues where it stopped. The cut depends on (data, seed, epoch,
seq_len, G) only: DP rank d owns the global rows [d*A*b, (d+1)*A*b) (A = grad_accum, b = micro
batch) and its micro-batch a holds rows d*A*b + a*b .. + b, so every split of G into DP ranks,
accumulation and loader workers sees the same sequences in the same global row order.

All DP ranks consume steps in lockstep, so the state is (epoch, remaining, layout = {global_rows,
seq_len}, steps consumed): the same on every rank. A resume with the same layout continues exactly
(whatever the DP size, accumulation or worker count); another G or seq_len cuts what was not
consumed anew: nothing repeated, nothing skipped, down to the token. All lanes of a phase give the
same number of steps; the end of each lane is padded (inputs end-of-text, labels -100).
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


def lane_bounds(remaining, rows: int, row: int) -> tuple[int, int]:
    """Global row `row`'s lane: its contiguous part of the remaining positions (counted within them)."""
    r = total(remaining)
    return row * r // rows, (row + 1) * r // rows


def phase_steps(remaining, layout: dict) -> int:
    """Optimizer steps until the remaining positions are used up (the longest lane, in sequences)."""
    longest_lane = math.ceil(total(remaining) / layout["global_rows"])
    return math.ceil(longest_lane / (layout["seq_len"] + 1))


def rank_rows(dp_rank: int, dp_size: int, grad_accum: int, batch_size: int) -> range:
    """The global rows of one DP rank, in the order of its micro-batches (A micro-batches of b rows)."""
    per_rank = grad_accum * batch_size
    return range(dp_rank * per_rank, (dp_rank + 1) * per_rank)


def unread(remaining, layout: dict, row: int, steps: int) -> list[list[int]]:
    """The stream intervals lane `row` still holds after `steps` steps."""
    lo, hi = lane_bounds(remaining, layout["global_rows"], row)
    return cut(remaining, min(lo + steps * (layout["seq_len"] + 1), hi), hi)


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


def unconsumed(remaining, layout: dict, steps: int) -> list[list[int]]:
    """The remaining intervals after `steps` optimizer steps under `layout`."""
    return merge([iv for row in range(layout["global_rows"]) for iv in unread(remaining, layout, row, steps)])


def same_layout(a: dict, b: dict) -> bool:
    return a["global_rows"] == b["global_rows"] and a["seq_len"] == b["seq_len"]


# --- Version 1 states (per-rank slots, up to this change): what they left unconsumed --------------
# A v1 state is resumed by cutting its unconsumed positions anew (as for any layout change), so a
# run checkpointed before the upgrade neither repeats nor skips data.

def _v1_phase_batches(remaining, layout: dict) -> int:
    slots = layout["dp_size"] * layout["slots_per_rank"]
    longest_lane = math.ceil(math.ceil(total(remaining) / slots) / layout["batch_size"])
    return math.ceil(longest_lane / (layout["seq_len"] + 1))


def worker_batches_done(k: int, worker: int, layout: dict, m: int) -> int:
    """v1: how many of a rank's first k batches of a phase (m per worker) worker `worker` served.

    Workers sent messages of `group` batches (the last of a phase shorter, r), taken round robin:
    message g of the phase came from worker g % n.
    """
    n, g = layout["slots_per_rank"], layout.get("group", 1)
    q = max(1, math.ceil(m / g))
    r = m - g * (q - 1)
    full = n * g * (q - 1)
    if k <= full:
        cycles, rem = divmod(k, g * n)
        return cycles * g + min(max(rem - worker * g, 0), g)
    return (q - 1) * g + min(max(k - full - worker * r, 0), r)


def unconsumed_v1(remaining, layout: dict, k: int) -> list[list[int]]:
    """The remaining intervals after every rank consumed k batches under a v1 layout."""
    n = layout["slots_per_rank"]
    slots, b = layout["dp_size"] * n, layout["batch_size"]
    seq, r = layout["seq_len"] + 1, total(remaining)
    m = _v1_phase_batches(remaining, layout)
    left = []
    for s in range(slots):
        done = worker_batches_done(k, s % n, layout, m)
        lo, hi = s * r // slots, (s + 1) * r // slots
        for i in range(b):
            a, e = lo + i * (hi - lo) // b, lo + (i + 1) * (hi - lo) // b
            left += cut(remaining, min(a + done * seq, e), e)
    return merge(left)
