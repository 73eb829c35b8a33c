"""The names of a model's modules that parallel/ needs to split it, as plain data.

The model side fills one (trainer/model_plan.py, beside the model it describes, as torchtitan keeps
sharding.py beside model.py) and passes it to `parallelize`; parallel/ reads names only from here,
so it imports no model and the model file stays free of parallel code. Dotted names inside a
block are relative to the block (e.g. "attention.wq").
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ParallelPlan:
    blocks: str                 # ModuleDict of the blocks; pipeline stages keep the keys they hold
    embedding: str              # token embedding (first pipeline stage); None on other stages
    positions: str              # learned/sinusoidal position table; None when the model has none
    final_norm: str             # norm before the head (last stage); None on other stages
    head: str                   # output projection to the vocabulary (last stage)
    tied_head: bool             # the head's weight is the embedding's
    attention: str              # inside a block: the attention module
    feed_forward: str           # inside a block: the MLP
    attention_norm: str         # inside a block: the norm before (pre-norm) or after attention
    ffn_norm: str               # inside a block: the norm of the MLP half
    qkv: tuple[str, ...]        # column-wise: query, key, value projections (split by heads)
    attention_out: str          # row-wise: attention output projection
    mlp_in: tuple[str, ...]     # column-wise: MLP input projections (gate and up for swiglu)
    mlp_out: str                # row-wise: MLP output projection
    head_buffers: tuple[str, ...] = ()  # per-head buffers on the attention module, sharded with the heads
    attention_core: str = "core"        # inside the attention module: softmax(qk)v, swapped by context parallel
    # inside a block: embedding tables [*, heads] (learned per-head biases), column-wise: each rank holds
    # and looks up its own heads' columns, a parameter sharded with the heads
    head_tables: tuple[str, ...] = ()
    # Mixture of Experts, inside a block (a block holding `moe_router` is a MoE block): the router and
    # the routed experts are replicated over TP and run on the rank's own tokens; the shared experts
    # are an MLP split like a dense one (column-wise in, row-wise out). The routed experts' weights
    # are stacked [experts, ...] on dim 0 and they are called as experts(tokens sorted by expert,
    # offs), offs the int32 cumulative row counts per expert (split over expert parallel).
    moe_router: str = ""
    moe_experts: str = ""
    moe_shared: str = ""
    moe_shared_in: tuple[str, ...] = ()
    moe_shared_out: str = ""

    @property
    def colwise(self) -> tuple[str, ...]:
        return (*self.qkv, *self.mlp_in, *self.head_tables)

    @property
    def rowwise(self) -> tuple[str, ...]:
        return (self.attention_out, self.mlp_out)
