"""Behaviour of the memory and time models: each mechanism moves the figures the way it must."""
import pytest

from parallel.planner.cluster import list_clusters, load_cluster
from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import chunks_in_flight, memory_per_gpu, model_state
from parallel.planner.predict import predict
from parallel.planner.shapes import flop_split, stage_layers
from parallel.planner.timing import group_link
from core.model_config import ModelConfig

CFG = ModelConfig(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden=11008,
                  max_seq_len=4096)
H100 = load_cluster("h100-sxm")
BASE = Layout(tp=1, pp=1, dp_shard=8, micro_batch=1, microbatches=4, dtype="bf16", seq_len=4096)


def test_all_four_profiles_load_with_their_memory():
    assert {"a100-80gb", "h100-sxm", "h200", "b200"} <= set(list_clusters())
    mem = {n: load_cluster(n).gpu_memory_gib for n in ("a100-80gb", "h100-sxm", "h200", "b200")}
    assert mem == {"a100-80gb": 80, "h100-sxm": 80, "h200": 141, "b200": 180}


def test_bad_profile_is_named(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('name = "bad"\ngpus_per_node = 8\ngpu_memory_gib = 80\nhbm_tbs = 2\n[peak_tflops]\nbf16 = 1\n'
                 '[network]\nnvlink_gbs = 1\nib_gbs_per_gpu = 1\n[efficiency]\nmatmul = 1.5\n')
    with pytest.raises(ValueError, match="efficiency"):
        load_cluster(str(p))


def test_flop_split_adds_up_to_model_config():
    fl = flop_split(CFG, 4096)
    assert CFG.n_layers * (fl.dense_per_layer + fl.attention_per_layer) + fl.head == pytest.approx(fl.total)
    assert fl.attention_per_layer == pytest.approx(12 * CFG.dim * 4096)   # 12 * H * Q * T per layer


def test_sharding_divides_model_state():
    ddp = model_state(CFG, BASE.replace(dp_shard=1, dp_replicate=8), Stack(), 0)
    fsdp = model_state(CFG, BASE, Stack(), 0)
    assert ddp.params == CFG.num_params()
    assert ddp.param_bytes == 4 * CFG.num_params() and ddp.optimizer_bytes == 8 * ddp.params + 4 * ddp.tensors
    assert fsdp.params == pytest.approx(ddp.params / 8, rel=1e-3) and fsdp.params >= ddp.params / 8
    tp = model_state(CFG, BASE.replace(tp=8, dp_shard=1), Stack(), 0)
    norms = (2 * CFG.n_layers + 1) * CFG.dim                             # replicated over TP ranks
    assert tp.params == (CFG.num_params() - norms) // 8 + norms


def test_activation_checkpointing_and_sp_reduce_activations():
    acts = {ac: memory_per_gpu(CFG, BASE.replace(tp=4, dp_shard=2, ac=ac), Stack(), H100).activations
            for ac in ("none", "selective", "full")}
    assert acts["none"] > acts["selective"] > acts["full"]
    no_sp = memory_per_gpu(CFG, BASE.replace(tp=4, dp_shard=2), Stack(), H100).activations
    sp = memory_per_gpu(CFG, BASE.replace(tp=4, dp_shard=2, sp=True), Stack(), H100).activations
    assert sp < no_sp


def test_schedules_hold_different_microbatches_in_flight():
    pp = BASE.replace(pp=4, dp_shard=2, microbatches=16)
    assert [chunks_in_flight(pp, s) for s in range(4)] == [4, 3, 2, 1]
    assert chunks_in_flight(pp.replace(pp_schedule="gpipe"), 0) == 16
    inter = pp.replace(pp_schedule="interleaved_1f1b", pp_virtual_stages=2)
    assert chunks_in_flight(inter, 0) == 2 * 4 + 4 - 1                  # Narayanan et al.: p(1 + (p-1)/(pv)) x v
    assert stage_layers(CFG, 4, 2, 0) == [0, 1, 2, 3, 16, 17, 18, 19]


def test_pipeline_bubble_shrinks_with_microbatches_and_schedule():
    def bubble_share(**kw):
        t = predict(CFG, BASE.replace(pp=4, dp_shard=2, **kw), H100).time
        return t.bubble / t.step
    assert bubble_share(microbatches=32) < bubble_share(microbatches=8)
    assert bubble_share(microbatches=8, pp_schedule="interleaved_1f1b", pp_virtual_stages=2) < bubble_share(microbatches=8)
    assert bubble_share(microbatches=8, pp_schedule="zero_bubble") < bubble_share(microbatches=8)


def test_tp_collectives_cost_time_only_with_tp():
    assert predict(CFG, BASE, H100).time.tp_comm == 0
    t = predict(CFG, BASE.replace(tp=8, dp_shard=1), H100).time
    assert t.tp_comm > 0


def test_network_placement():
    assert group_link(H100, 8, 1).bytes_per_s == pytest.approx(450e9 * 0.8)      # inside a node: NVLink
    assert group_link(H100, 4, 8).bytes_per_s == pytest.approx(50e9 * 0.9)       # one GPU per node: one rail
    assert group_link(H100, 16, 1).bytes_per_s == pytest.approx(8 * 50e9 * 0.9)  # 8 per node: 8 rails


def test_memory_grows_with_micro_batch_until_it_does_not_fit():
    fits = [predict(CFG, BASE.replace(micro_batch=mb, microbatches=1), H100).fits for mb in (1, 2, 4, 8, 16)]
    assert fits[0] and not fits[-1] and fits == sorted(fits, reverse=True)


def test_fp8_is_faster_on_hopper_and_refused_on_ampere():
    bf16 = predict(CFG, BASE, H100)
    fp8 = predict(CFG, BASE.replace(dtype="fp8"), H100)
    assert fp8.tokens_per_s > bf16.tokens_per_s
    with pytest.raises(ValueError, match="no fp8"):
        predict(CFG, BASE.replace(dtype="fp8"), load_cluster("a100-80gb"))


@pytest.mark.parametrize("change, field", [(dict(tp=3), "parallel.tp"), (dict(sp=True), "parallel.sp"),
                                          (dict(pp=4, microbatches=2), "parallel.pp_microbatches"),
                                          (dict(pp_virtual_stages=2), "parallel.pp_virtual_stages")])
def test_invalid_layouts_name_the_field(change, field):
    with pytest.raises(ValueError, match=field):
        predict(CFG, BASE.replace(**change), H100)
