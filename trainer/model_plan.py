"""The Transformer's parallel plan: which of trainer/model.py's modules parallel/ splits, by name.

Beside the model it describes (torchtitan keeps sharding.py beside model.py): a renamed module is
changed here and in model.py, and tensor parallel, pipeline split, activation checkpointing, FSDP
and the Hugging Face name map (trainer/hf_llama.py) all follow.
"""
from __future__ import annotations

from core.model_config import ModelConfig
from core.parallel_plan import ParallelPlan

BLOCKS, EMBEDDING, POSITIONS, FINAL_NORM, HEAD = "layers", "tok_embeddings", "pos_embeddings", "norm", "output"
ATTENTION, FEED_FORWARD, ATTENTION_NORM, FFN_NORM = "attention", "feed_forward", "attention_norm", "ffn_norm"
Q, K, V, O = (f"{ATTENTION}.{p}" for p in ("wq", "wk", "wv", "wo"))
REL_BIAS = f"{ATTENTION}.rel_bias.embeddings"      # model.position = "relative": [buckets, heads]
GATE, DOWN, UP = (f"{FEED_FORWARD}.{p}" for p in ("w1", "w2", "w3"))   # swiglu: w2(silu(w1 x) * w3 x)
ROUTER, EXPERTS, SHARED = (f"{FEED_FORWARD}.{p}" for p in ("router", "experts", "shared"))   # trainer/moe.py


def parallel_plan(cfg: ModelConfig) -> ParallelPlan:
    """The plan of `Transformer(cfg)`: gelu MLPs have no up projection (w3)."""
    swiglu = cfg.activation == "swiglu"
    return ParallelPlan(
        blocks=BLOCKS, embedding=EMBEDDING, positions=POSITIONS, final_norm=FINAL_NORM, head=HEAD,
        tied_head=cfg.tie_embeddings, attention=ATTENTION, feed_forward=FEED_FORWARD,
        attention_norm=ATTENTION_NORM, ffn_norm=FFN_NORM, qkv=(Q, K, V), attention_out=O,
        mlp_in=(GATE, UP) if swiglu else (GATE,), mlp_out=DOWN,
        head_buffers=("alibi_slopes",), head_tables=(REL_BIAS,) if cfg.position == "relative" else (),
        moe_router=ROUTER, moe_experts=EXPERTS, moe_shared=SHARED,
        moe_shared_in=(f"{SHARED}.w1", f"{SHARED}.w3") if swiglu else (f"{SHARED}.w1",), moe_shared_out=f"{SHARED}.w2")
