"""Expert parallel's local regrouping (parallel/expert.py); the all-to-alls themselves are checked
by the ep rows of test_parity.py against the single-process model."""
from __future__ import annotations

import torch

from parallel.expert import by_local_expert


def test_received_tokens_are_regrouped_by_local_expert():
    # 3 source ranks x 2 local experts: rows arrive as (source, expert) blocks of these sizes
    recv = torch.tensor([[1, 2], [0, 3], [2, 1]])
    labels = [(s, e) for s in range(3) for e in range(2) for _ in range(int(recv[s, e]))]
    perm = by_local_expert(recv)
    assert sorted(perm.tolist()) == list(range(len(labels)))
    got = [labels[i] for i in perm.tolist()]
    # expert 0's rows from sources 0, 1, 2, then expert 1's; each block keeps its arrival order
    assert got == sorted(labels, key=lambda se: (se[1], se[0]))
    assert perm.tolist() == [0, 6, 7, 1, 2, 3, 4, 5, 8]


def test_no_tokens_received():
    assert by_local_expert(torch.zeros(2, 2, dtype=torch.long)).numel() == 0
