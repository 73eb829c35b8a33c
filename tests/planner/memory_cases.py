"""Tiny models and layouts for the exact model-state memory test (4 ranks)."""
from core.model_config import ModelConfig

WORLD = 4

# GPT-style with biases, LayerNorm, learned positions and a vocabulary that 4 does not divide
# (FSDP pads); Llama-style with GQA and SwiGLU for TP and PP (sizes divide: exact to the byte).
GPT = ModelConfig(vocab_size=66, dim=32, n_layers=3, n_heads=4, activation="gelu", norm="layernorm",
                  bias=True, position="learned", max_seq_len=16)
LLAMA = ModelConfig(vocab_size=64, dim=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                    activation="swiglu", norm="rmsnorm", position="none", max_seq_len=16)

CASES = {
    "fsdp4": {"model": GPT, "tp": 1, "pp": 1, "seq_len": 8},
    "tp2_fsdp2": {"model": LLAMA, "tp": 2, "pp": 1, "seq_len": 8},
    "pp2_fsdp2": {"model": LLAMA, "tp": 1, "pp": 2, "seq_len": 8},
}
