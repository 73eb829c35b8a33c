"""T5's bucketed relative position bias, for a decoder (Raffel et al. 2020, section 2.1).

Each head adds a learned scalar to the score of query i and key j that depends only on the
bucket of their distance i - j (>= 0 in a causal model: T5's bidirectional=False): distances
below half the buckets get a bucket each, the rest share log-spaced buckets up to
`max_distance`, and every distance beyond it shares the last one. The table is [buckets, heads],
an nn.Embedding, so a tensor-parallel plan shards it column-wise with the heads (ColwiseParallel
on an embedding: Shard(1) on the table, each rank's lookup returns its own heads).

One table per layer, not T5's one table shared by all layers: a pipeline stage then holds the
tables of its own layers (no parameter tied across stages), and the cost is buckets x heads
per layer (32 x 8 = 256 numbers), nothing beside the layer's matrices.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def relative_bucket(dist: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each distance i - j (long tensor); negative distances (future keys, masked
    anyway) fall in bucket 0 like distance 0, as in T5's unidirectional case."""
    n = dist.clamp(min=0)
    max_exact = num_buckets // 2
    # log-spaced above max_exact; clamp(min=1) keeps log() finite where the exact branch is taken
    large = max_exact + (torch.log(n.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = large.clamp(max=num_buckets - 1)
    return torch.where(n < max_exact, n, large)


class RelativeBias(nn.Module):
    """distances i - j [..., T, S] (long) -> additive bias [..., H, T, S] of this rank's heads."""

    def __init__(self, num_buckets: int, max_distance: int, n_heads: int):
        super().__init__()
        self.num_buckets, self.max_distance = num_buckets, max_distance
        # named "embeddings": the optimizer neither decays it nor treats it as a muP hidden matrix
        self.embeddings = nn.Embedding(num_buckets, n_heads)

    def forward(self, dist: torch.Tensor) -> torch.Tensor:
        bias = self.embeddings(relative_bucket(dist, self.num_buckets, self.max_distance))   # [..., T, S, H]
        return bias.movedim(-1, -3)
