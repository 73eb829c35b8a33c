"""The CPU roofline MFU divides by (trainer/roofline.py): the GEMMs it times are the model's own."""
import pytest
import torch

from core.model_config import ModelConfig
from trainer.roofline import BareGemms, MatmulLimit, gemm_shapes, shape_flops

CASES = {
    "dense-swiglu": dict(),
    "gqa-gelu": dict(n_kv_heads=1, activation="gelu"),
    "moe-shared-every2": dict(moe_experts=4, moe_top_k=2, moe_shared_experts=1, moe_every=2, moe_hidden=48),
    "moe-gelu": dict(moe_experts=4, moe_top_k=1, activation="gelu"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_timed_gemms_are_the_flops_mfu_counts(case):
    """Per token, the GEMMs' FLOPs equal ModelConfig.flops_per_token (the MFU numerator, itself
    checked against torch's flop counter), exactly: the roofline and the MFU count the same work."""
    mc = ModelConfig(vocab_size=320, dim=64, n_layers=4, n_heads=4, max_seq_len=64, **CASES[case])
    mc.validate()
    B, T = 2, 32
    assert shape_flops(gemm_shapes(mc, B, T)) / (B * T) == mc.flops_per_token(T)


def test_measured_peak_is_a_matmul_rate():
    mc = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    for dtype in ("fp32", "bf16"):
        rate = MatmulLimit(mc, 4, 32, dtype, passes=2).flops_per_s
        assert 1e8 < rate < 1e15, (dtype, rate)       # 0.1 GFLOP/s .. 1 PFLOP/s: any CPU
    # the operands are the shapes asked for, at the precision asked for
    g = BareGemms([(1, 8, 16, 4), (3, 5, 6, 7)], torch.bfloat16)
    assert [(a.shape, w.shape, a.dtype) for a, w in g.pairs] == [
        ((8, 16), (16, 4), torch.bfloat16), ((3, 5, 6), (3, 6, 7), torch.bfloat16)]
    assert g.flops == 2 * 8 * 16 * 4 + 2 * 3 * 5 * 6 * 7


def test_the_limit_keeps_the_fastest_rate_seen():
    """A start-up timed under load must not cap the run's limit (MFU would pass 100% once the
    load went): retiming raises a low figure and never lowers a high one."""
    mc = ModelConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=64)
    limit = MatmulLimit(mc, 4, 32, "fp32", passes=1)
    limit.flops_per_s = 1.0                     # as if timed while the machine was saturated
    assert limit.retime() > 1e8
    limit.flops_per_s = 1e18
    assert limit.retime() == 1e18
