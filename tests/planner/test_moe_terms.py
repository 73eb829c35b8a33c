"""The planner's MoE terms against hand counts: parameters per rank (experts split over ep, FSDP
over the rest), what FSDP gathers, FLOPs from the active experts, the ep all-to-all time, and the
search trying ep sizes."""
import pytest

from core.model_config import ModelConfig
from parallel.planner.cluster import load_cluster
from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import model_state, unsharded_params
from parallel.planner.search import candidate_layouts
from parallel.planner.shapes import flop_split, param_specs
from parallel.planner.timing import group_link, step_time

# 2 blocks, each: attention 4 x 64 x 64 = 16384, router 8 x 64 = 512, experts 3 x 8 x 64 x 32 = 49152,
# two norms 128; final norm 64, embedding and head 128 x 64 = 8192 each.
CFG = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=128,
                  moe_experts=8, moe_top_k=2, moe_hidden=32)
TOTAL = 2 * (16384 + 512 + 49152 + 128) + 64 + 2 * 8192          # 148800
H100 = load_cluster("h100-sxm")


def layout(**kw):
    return Layout(**{"dp_shard": 4, "micro_batch": 2, "microbatches": 1, "seq_len": 128, "dtype": "bf16", **kw})


def test_specs_count_every_expert():
    assert sum(s.numel for s in param_specs(CFG)) == TOTAL == CFG.num_params()


def test_experts_split_over_ep_then_fsdp_over_the_rest():
    # ep 2 x FSDP 2 over the experts: 8 / 2 / 2 = 2 experts of 3 x 64 x 32 per rank per block; the
    # rest FSDP over 4: attention 4 x 16 x 64, router 2 x 64, norms 2 x 16; embedding, head 32 x 64, norm 16
    per_rank = 2 * (2 * 6144 + 4096 + 128 + 32) + 2 * 2048 + 16
    for ep in (1, 2, 4):        # all dp_shard ranks share the experts either way: ep moves no memory at rest
        assert model_state(CFG, layout(ep=ep), Stack(), 0).params == per_rank == 37200
    # ... but FSDP gathers only this rank's ep slice: 8 / ep experts of 6144 per block
    assert unsharded_params(CFG, layout(ep=1), 0)[0] == TOTAL
    assert unsharded_params(CFG, layout(ep=2), 0)[0] == TOTAL - 2 * 4 * 6144
    assert unsharded_params(CFG, layout(ep=4), 0)[0] == TOTAL - 2 * 6 * 6144


def test_flops_count_the_active_experts_only():
    # a token uses attention, the router and 2 of 8 experts: 16384 + 512 + 2 x 6144 = 29184 per block
    split = flop_split(CFG, 128)
    assert split.dense_per_layer == 6 * 29184
    assert split.total == 6 * (2 * 29184 + 8192) + 12 * 2 * 4 * 16 * 128


def test_all_to_all_time_is_dispatch_and_combine_per_moe_block():
    # per MoE block and pass: dispatch + combine of 2 x 128 tokens x top-2 x 64 x 2 bytes = 65536 bytes,
    # each rank sending (ep - 1) / ep of it over NVLink (ep 2 x tp 1 sits in one node)
    link = group_link(H100, 2, 1)
    one = 2 * (0.5 * 65536 / link.bytes_per_s + link.latency_s)
    assert step_time(CFG, layout(ep=1), Stack(), H100).ep_comm == 0.0
    assert step_time(CFG, layout(ep=2), Stack(), H100).ep_comm == pytest.approx(2 * 2 * one, rel=1e-12)
    # full recompute runs the forward's all-to-alls again
    assert step_time(CFG, layout(ep=2, ac="full"), Stack(), H100).ep_comm == pytest.approx(3 * 2 * one, rel=1e-12)
    dense = ModelConfig(**{**CFG.__dict__, "moe_every": 2})          # one MoE block of two: half
    assert step_time(dense, layout(ep=2), Stack(), H100).ep_comm == pytest.approx(2 * one, rel=1e-12)


def test_search_tries_ep_sizes_that_divide_experts_and_dp_shard():
    eps = {(l.dp_shard, l.ep) for l in candidate_layouts(CFG, 8, 16, 128, "bf16", H100)}
    assert (8, 8) in eps and (8, 2) in eps and (1, 1) in eps and all(s % e == 0 for s, e in eps)
    dense = ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, max_seq_len=128)
    assert {l.ep for l in candidate_layouts(dense, 8, 16, 128, "bf16", H100)} == {1}
    with pytest.raises(ValueError, match="parallel.ep: 3 must divide model.moe_experts=8"):
        layout(ep=3, dp_shard=6).validate(CFG)
    assert "--parallel.ep" in layout(ep=2).overrides() and "--parallel.ep" not in layout().overrides()
