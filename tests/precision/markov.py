"""Learnable synthetic token streams for precision tests: a fixed random Markov chain, so the loss
falls towards the chain's entropy instead of a memorised random batch (where tiny rounding
differences decide how far memorisation gets)."""
from __future__ import annotations

import torch

from tests.trainer.fixtures import FixedBatches


class MarkovBatches(FixedBatches):
    """Batch i is drawn from the chain with a generator seeded by (seed, i) (FixedBatches gives the
    iteration and the position state; nothing is stored): deterministic, never
    repeated, resumable by position. DP rank r takes rows [r*B:(r+1)*B] of one global batch."""

    def __init__(self, vocab: int, seq_len: int, batch_size: int, seed: int = 0, dp_rank: int = 0,
                 dp_size: int = 1, branching: int = 4):
        g = torch.Generator().manual_seed(1234)           # the chain is the same for every split and seed
        self.next_tokens = torch.randint(0, vocab, (vocab, branching), generator=g)
        self.probs = torch.softmax(torch.arange(branching, 0, -1, dtype=torch.float32), 0)
        self.vocab, self.seq_len, self.batch_size = vocab, seq_len, batch_size
        self.seed, self.dp_rank, self.dp_size = seed, dp_rank, dp_size
        self.pos = 0

    def entropy(self) -> float:
        """Nats per token of the chain: the loss floor."""
        return float(-(self.probs * self.probs.log()).sum())

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        rows = self.batch_size * self.dp_size
        tok = torch.randint(0, self.vocab, (rows,), generator=g)
        seq = [tok]
        for _ in range(self.seq_len):
            choice = torch.multinomial(self.probs.expand(rows, -1), 1, generator=g)[:, 0]
            tok = self.next_tokens[tok, choice]
            seq.append(tok)
        full = torch.stack(seq, 1)[self.dp_rank * self.batch_size:(self.dp_rank + 1) * self.batch_size]
        return full[:, :-1].contiguous(), full[:, 1:].contiguous()



def markov_factory(vocab: int = 320):
    def factory(cfg, *, split, seq_len, batch_size, dp_rank, dp_size, seed):
        return MarkovBatches(vocab, seq_len, batch_size, seed + 7919 * (split == "val"), dp_rank, dp_size)
    return factory
