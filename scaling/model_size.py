"""N (with and without embeddings) and FLOPs per token of a model config, without building it.
One call site for the whole package: the trainer's ModelConfig when it is importable, else a
Llama-style estimate used only until the trainer lands (the stored N always comes from the run's
summary.json once a run finished)."""
from __future__ import annotations

import dataclasses


def model_numbers(model: dict, seq_len: int) -> tuple[int, int, float]:
    """(n_params incl. embeddings, n_params excl. embeddings, flops_per_token)."""
    try:
        from trainer.model_config import ModelConfig
    except ImportError:
        return _estimate(model, seq_len)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in model.items() if k in names})
    return (int(cfg.num_params(include_embedding=True)), int(cfg.num_params(include_embedding=False)),
            float(cfg.flops_per_token(seq_len)))


def _estimate(model: dict, seq_len: int) -> tuple[int, int, float]:
    dim, layers, heads = model["dim"], model["n_layers"], model["n_heads"]
    kv = model.get("n_kv_heads") or heads
    vocab = model["vocab_size"]
    ffn = model.get("ffn_hidden") or 4 * dim
    head_dim = dim // heads
    per_layer = 2 * dim * dim + 2 * dim * kv * head_dim + 3 * dim * ffn + 2 * dim
    non_emb = layers * per_layer + dim
    emb = vocab * dim * (1 if model.get("tie_embeddings", False) else 2)
    flops = 6 * (non_emb + vocab * dim) + 12 * layers * dim * seq_len
    return non_emb + emb, non_emb, float(flops)
