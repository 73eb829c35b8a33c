"""Predicted activation bytes per layer = what autograd really saves for trainer.model's block."""
import pytest
import torch

from parallel.planner.layout import Layout, Stack
from parallel.planner.memory import layer_activation_bytes_per_token, layer_saved_bytes_per_token
from trainer.model import Transformer
from core.model_config import ModelConfig
from trainer import attention


@pytest.fixture(autouse=True)
def sdpa_attention(monkeypatch):
    """The planner models SDPA's fused attention (what a GPU runs: nothing T x S kept). On CPU in
    bf16 short sequences take trainer/attention.py's explicit path, which also keeps the bf16
    probabilities for backward; measure the path the planner models."""
    monkeypatch.setattr(attention, "CPU_BF16_EXPLICIT_MAX_KEYS", 0)

# LayerNorm: a fused kernel on CPU as on GPU (torch's CPU RMSNorm is composite, unlike CUDA's)
CONFIGS = {
    "gpt": ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, activation="gelu", norm="layernorm",
                       bias=True, position="learned", max_seq_len=64),
    "swiglu_gqa_rope": ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                                   norm="layernorm", position="rope", max_seq_len=64),
}


def rope_tables_bytes(cfg: ModelConfig, s: int) -> int:
    """Per block, not per token (so not in the planner's per-token figure): apply_rope widens the
    bf16 model's angle table to fp32 on each call (q, then k) and the products save cos [T, hd/2]
    and (-sin, sin) [T, hd]; 0 without RoPE."""
    return 2 * s * (cfg.head_dim // 2 + cfg.head_dim) * 4 if cfg.position == "rope" else 0


def saved_bytes(cfg: ModelConfig, b: int, s: int, checkpoint: bool = False) -> int:
    """Bytes of distinct storages autograd saves in one block's forward (weights and buffers excluded)."""
    torch.manual_seed(0)
    model = Transformer(cfg).to(torch.bfloat16)
    layer = model.layers["0"]
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()] if t is not None}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.randn(b, s, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
    rope = model.rope[:s] if model.rope is not None else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if checkpoint:
            torch.utils.checkpoint.checkpoint(layer, x, rope, use_reentrant=False)
        else:
            layer(x, rope)
    return sum(seen.values())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_layer_activations_match_autograd(name):
    cfg, b, s = CONFIGS[name], 2, 64
    layout = Layout(seq_len=s, dtype="bf16")
    predicted = layer_activation_bytes_per_token(cfg, layout, Stack()) * b * s
    measured = saved_bytes(cfg, b, s)
    # the two LayerNorms' mean and rstd are fp32 on GPU (predicted: 8 bytes a token), bf16 on CPU (4)
    assert measured == predicted - 2 * 4 * b * s + rope_tables_bytes(cfg, s)


def test_full_checkpointing_keeps_only_the_layer_input():
    cfg, b, s = CONFIGS["gpt"], 2, 64
    predicted = layer_saved_bytes_per_token(cfg, Layout(seq_len=s, dtype="bf16", ac="full"), Stack()) * b * s
    assert saved_bytes(cfg, b, s, checkpoint=True) == predicted


@pytest.mark.parametrize("shared", [0, 1])
def test_moe_block_activations_match_autograd(shared):
    """A MoE block (8 experts of width 32, top-2, +- a shared expert) in training mode, bf16."""
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden=96, norm="layernorm",
                      position="rope", max_seq_len=64, moe_experts=8, moe_top_k=2, moe_hidden=32,
                      moe_shared_experts=shared)
    b, s = 2, 64
    predicted = layer_activation_bytes_per_token(cfg, Layout(seq_len=s, dtype="bf16"), Stack()) * b * s
    # per block, not per token (so not in the per-token figure): the router weight's fp32 copy
    # (8 x 64 x 4 bytes), the int32 expert offsets and the fp32 expert counts (8 x 4 bytes each)
    per_block = 8 * 64 * 4 + 2 * 8 * 4
    assert saved_bytes(cfg, b, s) == predicted - 2 * 4 * b * s + per_block + rope_tables_bytes(cfg, s)  # LN stats as above
