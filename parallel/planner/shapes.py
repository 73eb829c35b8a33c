"""What a model is made of, as the cost model needs it: parameter tensors with their tensor-parallel
style and pipeline placement, and the training FLOPs split into layer matmuls, attention and head.

FLOPs are never counted here: they come from `ModelConfig.flops_per_token`, taken apart by asking
it about the same model with no layers or a zero-length context.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache
from typing import Literal

from core.model_config import ModelConfig

TPStyle = Literal["colwise", "rowwise", "replicate", "expert"]


@dataclass(frozen=True)
class ParamSpec:
    name: str
    shape: tuple[int, ...]
    tp: TPStyle                  # colwise: dim 0 sharded over TP ranks; rowwise: dim 1 (bias replicated);
                                 # expert: stacked experts [E, ...], dim 0 split over the ep ranks (not TP)
    place: Literal["layer", "first", "last"]
    layer: int = -1

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def local_shape(spec: ParamSpec, tp: int) -> list[int]:
    """The largest local shape among TP ranks (DTensor Shard splits like torch.chunk)."""
    shape = list(spec.shape)
    if spec.tp == "colwise":
        shape[0] = _cdiv(shape[0], tp)
    elif spec.tp == "rowwise" and len(shape) == 2:
        shape[1] = _cdiv(shape[1], tp)
    return shape


def local_numel(spec: ParamSpec, tp: int = 1, dp_shard: int = 1, ep: int = 1) -> int:
    """Elements this rank stores for the parameter after TP and FSDP sharding. FSDP2 shards dim 0
    of the TP-local tensor into equal, padded pieces, so the figure is exact up to that padding
    (and exact when the sizes divide). Expert parallel (ep divides dp_shard) splits the experts
    over ep ranks and FSDP shards each slice over the other dp_shard / ep ranks."""
    shape = local_shape(spec, tp)
    if spec.tp == "expert" and ep > 1:
        shape[0] = _cdiv(shape[0], ep)
        dp_shard = max(1, dp_shard // ep)
    n = _cdiv(shape[0], dp_shard)
    for s in shape[1:]:
        n *= s
    return n


def param_specs(cfg: ModelConfig) -> list[ParamSpec]:
    """Every parameter of `trainer.model.Transformer(cfg)`, named as its state dict names them."""
    d, hd, H = cfg.dim, cfg.head_dim, cfg.hidden
    q, kv = cfg.n_heads * hd, cfg.kv_heads * hd
    norm_bias = cfg.norm == "layernorm" and cfg.bias
    specs: list[ParamSpec] = [ParamSpec("tok_embeddings.weight", (cfg.vocab_size, d), "colwise", "first")]
    if cfg.position == "learned":
        specs.append(ParamSpec("pos_embeddings.weight", (cfg.max_seq_len, d), "replicate", "first"))
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        moe = cfg.is_moe_layer(i)
        mlp, width = ("feed_forward.shared", cfg.moe_shared_experts * cfg.expert_hidden) if moe else ("feed_forward", H)
        mats = [("attention.wq", q, d, "colwise"), ("attention.wk", kv, d, "colwise"),
                ("attention.wv", kv, d, "colwise"), ("attention.wo", d, q, "rowwise"), "experts"]
        if width:    # the dense MLP, or a MoE block's shared experts (one MLP of their summed width)
            mats += [(f"{mlp}.w1", width, d, "colwise"), (f"{mlp}.w2", d, width, "rowwise")]
            if cfg.activation == "swiglu":
                mats.append((f"{mlp}.w3", width, d, "colwise"))
        for mat in mats:
            if mat == "experts":      # in the model's order: attention, router and experts, shared experts
                specs += _expert_specs(cfg, p, i) if moe else []
                continue
            name, out_f, in_f, style = mat
            specs.append(ParamSpec(p + name + ".weight", (out_f, in_f), style, "layer", i))
            if cfg.bias:
                specs.append(ParamSpec(p + name + ".bias", (out_f,), style if style == "colwise" else "replicate", "layer", i))
        if cfg.position == "relative":   # the T5 bias table [buckets, heads]: dim 1 sharded with the heads
            specs.append(ParamSpec(p + "attention.rel_bias.embeddings.weight", (cfg.rel_buckets, cfg.n_heads),
                                   "rowwise", "layer", i))
        for norm in ("attention_norm", "ffn_norm"):
            specs.append(ParamSpec(p + norm + ".weight", (d,), "replicate", "layer", i))
            if norm_bias:
                specs.append(ParamSpec(p + norm + ".bias", (d,), "replicate", "layer", i))
    specs.append(ParamSpec("norm.weight", (d,), "replicate", "last"))
    if norm_bias:
        specs.append(ParamSpec("norm.bias", (d,), "replicate", "last"))
    if not cfg.tie_embeddings:
        specs.append(ParamSpec("output.weight", (cfg.vocab_size, d), "colwise", "last"))
    return specs


def _expert_specs(cfg: ModelConfig, prefix: str, layer: int) -> list[ParamSpec]:
    """A MoE block's router (replicated) and stacked experts (trainer/moe.py's shapes)."""
    e, d, h = cfg.moe_experts, cfg.dim, cfg.expert_hidden
    p = prefix + "feed_forward."
    specs = [ParamSpec(p + "router.weight", (e, d), "replicate", "layer", layer),
             ParamSpec(p + "experts.w1", (e, d, h), "expert", "layer", layer),
             ParamSpec(p + "experts.w2", (e, h, d), "expert", "layer", layer)]
    if cfg.activation == "swiglu":
        specs.append(ParamSpec(p + "experts.w3", (e, d, h), "expert", "layer", layer))
    return specs


def stage_layers(cfg: ModelConfig, pp: int, virtual: int, stage: int) -> list[int]:
    """Layer indices held by pipeline rank `stage`: chunk c of pp*virtual chunks goes to rank
    c % pp (the interleaved placement), layers split as evenly as they go, larger chunks first."""
    chunks = pp * virtual
    base, extra = divmod(cfg.n_layers, chunks)
    layers, start = [], 0
    for c in range(chunks):
        n = base + (1 if c < extra else 0)
        if c % pp == stage:
            layers.extend(range(start, start + n))
        start += n
    return layers


@lru_cache(maxsize=64)
def _one_layer_specs(cfg_values: tuple) -> list[ParamSpec]:
    return param_specs(ModelConfig(*cfg_values))


def _layer_kind_specs(cfg: ModelConfig, moe: bool) -> list[ParamSpec]:
    """One block's specs: a MoE block (every block MoE) or a dense one (no experts)."""
    one = replace(cfg, n_layers=1, moe_every=1) if moe else replace(cfg, n_layers=1, moe_experts=0)
    return [s for s in _one_layer_specs(tuple(getattr(one, f.name) for f in fields(one))) if s.place == "layer"]


def stage_layer_count(n_layers: int, pp: int, virtual: int, stage: int) -> int:
    """len(stage_layers(...)) without listing them."""
    base, extra = divmod(n_layers, pp * virtual)
    return virtual * base + sum(1 for c in range(stage, min(extra, pp * virtual), pp))


def stage_param_specs(cfg: ModelConfig, pp: int, virtual: int, stage: int) -> list[ParamSpec]:
    """Parameters on one pipeline rank. A tied head on a separate last stage keeps its own copy
    of the embedding (Megatron does the same and all-reduces the two gradients)."""
    layers = set(stage_layers(cfg, pp, virtual, stage))
    first, last = stage == 0, stage == pp - 1
    out = [s for s in param_specs(cfg)
           if (s.place == "layer" and s.layer in layers) or (s.place == "first" and first)
           or (s.place == "last" and last)]
    return out + _tied_copy(cfg, first, last)


def _tied_copy(cfg: ModelConfig, first: bool, last: bool) -> list[ParamSpec]:
    if cfg.tie_embeddings and last and not first:
        return [ParamSpec("output.weight(tied copy)", (cfg.vocab_size, cfg.dim), "colwise", "last")]
    return []


def stage_param_groups(cfg: ModelConfig, pp: int, virtual: int, stage: int) -> list[tuple[int, list[ParamSpec]]]:
    """The same parameters as `stage_param_specs`, as (count, specs) groups: the layers are all
    alike, so one layer's specs stand for all of them (the search evaluates many layouts)."""
    n_layers = stage_layer_count(cfg.n_layers, pp, virtual, stage)
    one = _one_layer_specs(tuple(1 if f.name == "n_layers" else getattr(cfg, f.name) for f in fields(cfg)))
    first, last = stage == 0, stage == pp - 1
    if cfg.moe_experts:      # MoE and dense blocks differ: one group of each kind
        n_moe = sum(cfg.is_moe_layer(i) for i in stage_layers(cfg, pp, virtual, stage))
        groups = [(c, _layer_kind_specs(cfg, moe)) for c, moe in ((n_layers - n_moe, False), (n_moe, True)) if c]
    else:
        groups = [(n_layers, [s for s in one if s.place == "layer"])]
    edges = [s for s in one if (s.place == "first" and first) or (s.place == "last" and last)]
    edges += _tied_copy(cfg, first, last)
    groups += [(1, [s]) for s in edges]
    return groups


@dataclass(frozen=True)
class FlopSplit:
    """Training FLOPs per token (forward + backward = 3 passes), from ModelConfig."""
    dense_per_layer: float       # matmuls with weights
    attention_per_layer: float   # score and value products (full T x T, as ModelConfig counts)
    head: float                  # output projection (and anything else outside the layers)
    total: float


def flop_split(cfg: ModelConfig, seq_len: int) -> FlopSplit:
    total = cfg.flops_per_token(seq_len)
    no_layers = replace(cfg, n_layers=0)
    head = no_layers.flops_per_token(seq_len)
    dense = (cfg.flops_per_token(0) - no_layers.flops_per_token(0)) / cfg.n_layers
    attn = (total - cfg.flops_per_token(0)) / cfg.n_layers
    return FlopSplit(dense, attn, head, total)
