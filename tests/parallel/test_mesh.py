"""Layout resolution and the checks that name the offending field."""
import pytest

from core.parallel_config import ParallelConfig
from parallel.dims import ParallelDims
from core.layout import stage_layer_counts, validate_layout
from core.errors import ConfigError
from core.model_config import ModelConfig


def model(**kw):
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128, vocab_size=128)
    base.update(kw)
    return ModelConfig(**base)


def test_fill_and_product_mismatch():
    d = ParallelDims.resolve(ParallelConfig(tp=2, pp=2), 8)
    assert (d.pp, d.dp_replicate, d.dp_shard, d.tp, d.dp_size) == (2, 1, 2, 2, 2)
    assert d.fsdp_enabled and not d.ddp_enabled
    assert ParallelDims.resolve(ParallelConfig(dp_replicate=2, dp_shard=1), 2).ddp_enabled
    with pytest.raises(ConfigError, match="world size is 8"):
        ParallelDims.resolve(ParallelConfig(tp=2, dp_shard=3), 8)
    with pytest.raises(ConfigError, match="does not divide the world size 6"):
        ParallelDims.resolve(ParallelConfig(tp=4), 6)


@pytest.mark.parametrize("kw,match", [
    (dict(n_heads=6, dim=60), "model.n_heads = 6"),  # tp=4 does not divide 6 heads
    (dict(n_kv_heads=1), "model.n_kv_heads = 1"),
    (dict(ffn_hidden=129), "MLP width"),
    (dict(vocab_size=129), "model.vocab_size"),
])
def test_tp_must_divide_heads_kv_heads_mlp_vocab(kw, match):
    tp = 4 if "n_heads" in kw else 2
    with pytest.raises(ConfigError, match=match):
        validate_layout(ParallelConfig(tp=tp), model(**kw), batch_size=8)


def test_pipeline_checks():
    validate_layout(ParallelConfig(pp=2), model(), batch_size=8)
    with pytest.raises(ConfigError, match="only model.n_layers = 4"):
        validate_layout(ParallelConfig(pp=8), model(), batch_size=8)
    with pytest.raises(ConfigError, match="fewer than the 2 pipeline stages"):
        validate_layout(ParallelConfig(pp=2, pp_microbatches=1), model(), batch_size=8)
    with pytest.raises(ConfigError, match="multiple of parallel.pp"):
        validate_layout(ParallelConfig(pp=2, pp_microbatches=3, pp_schedule="interleaved_1f1b",
                                       pp_virtual_stages=2), model(), batch_size=6)
    with pytest.raises(ConfigError, match="does not divide train.batch_size"):
        validate_layout(ParallelConfig(pp=2, pp_microbatches=4), model(), batch_size=6)
    with pytest.raises(ConfigError, match="pp_layers"):
        validate_layout(ParallelConfig(pp=2, pp_layers=[1, 2]), model(), batch_size=8)
    with pytest.raises(ConfigError, match="tie_embeddings"):
        validate_layout(ParallelConfig(pp=2), model(tie_embeddings=True), batch_size=8)
    with pytest.raises(ConfigError, match="needs an interleaved schedule"):
        validate_layout(ParallelConfig(pp=2, pp_virtual_stages=2), model(), batch_size=8)


def test_stage_layer_counts_even_and_uneven():
    assert stage_layer_counts(ParallelConfig(pp=2), 5) == [3, 2]
    assert stage_layer_counts(ParallelConfig(pp=2, pp_virtual_stages=2), 4) == [1, 1, 1, 1]
    assert stage_layer_counts(ParallelConfig(pp=2, pp_layers=[1, 3]), 4) == [1, 3]


def test_expert_parallel_is_carved_out_of_dp_shard():
    d = ParallelDims.resolve(ParallelConfig(ep=2), 4)
    assert (d.dp_shard, d.ep, d.dp_size) == (4, 2, 4) and d.ep_enabled and d.fsdp_enabled
    with pytest.raises(ConfigError, match="parallel.ep: 4 does not divide parallel.dp_shard = 2"):
        ParallelDims.resolve(ParallelConfig(ep=4, tp=2), 4)
    moe = model(moe_experts=4)
    validate_layout(ParallelConfig(ep=2), moe, batch_size=8)
    with pytest.raises(ConfigError, match="parallel.ep: 3 does not divide model.moe_experts = 4"):
        validate_layout(ParallelConfig(ep=3), moe, batch_size=8)
    with pytest.raises(ConfigError, match=r"parallel.ep: 2 needs a MoE model"):
        validate_layout(ParallelConfig(ep=2), model(), batch_size=8)
    with pytest.raises(ConfigError, match=r"parallel.ep: expert parallel is built on FSDP"):
        validate_layout(ParallelConfig(ep=2, engine="deepspeed"), moe, batch_size=8)
