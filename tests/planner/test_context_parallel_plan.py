"""The planner counts context parallel: a rank keeps 1/cp of a sequence's activations and pays
the ring's K/V passes; `plan` proposes CP when no layout without it fits the sequence."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from parallel.planner.cluster import load_cluster
from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import memory_per_gpu
from parallel.planner.run_config import read_run_config
from parallel.planner.search import search
from parallel.planner.timing import step_time

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "llama3-8b.toml"


def test_activations_per_rank_fall_as_one_over_cp_and_the_ring_costs_time():
    model, h100 = read_run_config(str(CONFIG), []).model, load_cluster("h100-sxm")
    base = Layout(dp_shard=8, seq_len=32768, ac="full")
    one, two = (memory_per_gpu(model, replace(base, dp_shard=8 // cp, cp=cp), Stack(), h100) for cp in (1, 2))
    # same shard group (dp_shard x cp = 8): the same model state; half the tokens per rank
    assert (two.params, two.optimizer) == (one.params, one.optimizer)
    assert abs(two.activations / one.activations - 0.5) < 1e-9 and abs(two.logits / one.logits - 0.5) < 1e-9
    t1, t2 = (step_time(model, replace(base, dp_shard=8 // cp, cp=cp, micro_batch=1), Stack(), h100) for cp in (1, 2))
    assert t2.tp_comm > t1.tp_comm      # the K/V ring (no TP here)


def test_plan_proposes_cp_when_the_sequence_does_not_fit():
    model, h100 = read_run_config(str(CONFIG), []).model, load_cluster("h100-sxm")
    # 256K tokens on 16 H100: even tp 8 + sp + full recomputation leaves too much per rank
    best = search(model, h100, 16, 2, 262144, headroom=0.9).ranked[0]
    assert best.layout.cp > 1 and "--parallel.cp" in best.layout.overrides()
    assert search(model, h100, 8, 2048, 2048).ranked[0].layout.cp == 1   # an ordinary length: no CP
