"""Deterministic in-memory token batches for trainer tests (no corpus, no files), and the
one-thread fixture of the tiny-model tests."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread than on two shared ones (no thread hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class FixedBatches:
    """Cycles over `n` fixed random batches; seeded; has the loader's state interface."""

    def __init__(self, vocab: int, seq_len: int, batch_size: int, n: int = 4, seed: int = 0, dp_rank: int = 0, dp_size: int = 1):
        g = torch.Generator().manual_seed(seed)
        full = torch.randint(0, vocab, (n, batch_size * dp_size, seq_len + 1), generator=g)
        mine = full[:, dp_rank * batch_size:(dp_rank + 1) * batch_size]
        self.batches = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in mine]
        self.pos = 0

    def batch(self, i: int):
        return self.batches[i % len(self.batches)]

    def __iter__(self):
        while True:
            b = self.batch(self.pos)
            self.pos += 1
            yield b

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, d):
        self.pos = d["pos"]


def fixed_factory(n: int = 4, vocab: int = 320):
    def factory(cfg, *, split, seq_len, batch_size, dp_rank, dp_size, seed):
        return FixedBatches(vocab, seq_len, batch_size, n, seed + (split == "val"), dp_rank, dp_size)
    return factory
