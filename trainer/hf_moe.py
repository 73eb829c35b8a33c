"""Our MoE Transformer's weights -> a Hugging Face MoE model (Mixtral, Qwen2-MoE or Glm4-MoE) and config.

Attention, norms, embeddings and dense blocks are Llama's (trainer/hf_llama.py, RoPE permutation
included); the format is chosen by the routing maths, each checked against transformers' source:
- softmax router, top-k renormalised, every block MoE, no shared experts -> Mixtral
  (MixtralTopKRouter: softmax, topk, always divided by the top-k sum).
- any other softmax router -> Qwen2-MoE (norm_topk_prob = moe_norm_topk; MoE blocks where
  (layer + 1) % decoder_sparse_step == 0, ours where layer % moe_every == moe_every - 1: the same
  blocks). Its shared expert is always on and scaled by sigmoid(shared_expert_gate . x): a zero gate
  weight gives exactly 0.5, so the shared expert's down projection is written x2 (a power of two:
  exact in any float format, so 0.5 x (2W)h == Wh bit for bit). Without shared experts its width is 0.
- sigmoid router (+ the aux-loss-free expert bias) -> Glm4-MoE (Glm4MoeTopkRouter: topk over
  sigmoid + e_score_correction_bias, gates the unbiased sigmoid, / (sum + 1e-20) if norm_topk_prob,
  x routed_scaling_factor = 1; n_group = topk_group = 1 keeps every expert eligible), with standard
  attention (use_qk_norm false, partial_rotary_factor 1). Its dense blocks are the first
  first_k_dense_replace only. DeepSeek-V3 routes the same way but its attention is MLA (an RMSNorm on
  the compressed KV and one RoPE key shared by all heads): no weights of ours give it our attention.
- a softmax router with an expert bias (moe_bias_rate > 0) -> Ernie-4.5-MoE (Ernie4_5_MoeTopKRouter:
  topk over softmax + moe_statics.e_score_correction_bias, gates the unbiased softmax, always
  divided by their sum clamped at moe_norm_min, set to our 1e-20; MoE blocks where (layer + 1) %
  moe_layer_interval == 0). Its RoPE rotates interleaved pairs as ours does: q and k are written
  unpermuted. Without moe_norm_topk no format has this routing: refused, naming the key.
Experts are written one tensor per expert (`experts.<i>.gate_proj.weight`, Mixtral `w1/w3/w2`):
the layout of the published checkpoints, which transformers 5 fuses on load and older versions,
vLLM and llama.cpp read as they are. Hugging Face runs dropless: an export of a run with
moe_capacity_factor > 0 gives the logits our model gives when no token is over capacity.
Export only: `checkpoint.init_from` of an MoE export is not read back yet.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from trainer import model_plan as M
from trainer.checkpoint_state import CheckpointError
from trainer.hf_llama import (K_WEIGHT, Q_WEIGHT, check_llama_shaped, hf_config, hf_name, llama_problems, llama_tensor,
                              q_fold, to_hf)

MIXTRAL, QWEN2_MOE, GLM4_MOE, ERNIE_MOE = "mixtral", "qwen2_moe", "glm4_moe", "ernie4_5_moe"
ARCHITECTURES = {MIXTRAL: "MixtralForCausalLM", QWEN2_MOE: "Qwen2MoeForCausalLM", GLM4_MOE: "Glm4MoeForCausalLM",
                 ERNIE_MOE: "Ernie4_5_MoeForCausalLM"}
NORM_MIN = 1e-20            # trainer/moe.py's clamp of the top-k sum
SHARED_GATE_FOLD = 2.0      # 1 / sigmoid(0): Qwen2-MoE's shared expert gate at a zero weight


def moe_layers(mc) -> list[int]:
    return [i for i in range(mc.n_layers) if mc.is_moe_layer(i)]


def moe_format(mc) -> str:
    """The Hugging Face format that computes what our MoE model computes, or a CheckpointError
    naming the key no format expresses."""
    wrong = llama_problems(mc)
    if wrong:
        raise CheckpointError("only MoE models with Llama's attention and MLPs (rope, rmsnorm, pre-norm, swiglu, "
                              "no bias) can be exported to Hugging Face; this model has " + "; ".join(wrong))
    if getattr(mc, "attn_window", 0):     # Qwen2-MoE and Glm4-MoE window otherwise or not at all; Mixtral untried
        raise CheckpointError(f"model.attn_window = {mc.attn_window}: sliding-window attention is exported for dense "
                              "models only (Mistral); a MoE export needs model.attn_window = 0")
    if mc.moe_router == "sigmoid":
        layers = moe_layers(mc)
        if layers != list(range(layers[0], mc.n_layers)):
            raise CheckpointError(
                f"model.moe_every = {mc.moe_every}: a sigmoid router exports to Glm4-MoE, whose dense blocks must "
                f"come first (MoE blocks here: {layers}); use moe_every = 1 or moe_router = 'softmax'")
        if mc.moe_experts < 2:      # its group scores take the top 2 of each group
            raise CheckpointError(f"model.moe_experts = {mc.moe_experts}: Glm4-MoE (sigmoid router) needs >= 2")
        return GLM4_MOE
    if mc.moe_bias_rate > 0:
        if not mc.moe_norm_topk:
            raise CheckpointError(
                f"model.moe_norm_topk = false: no Hugging Face MoE format picks experts by softmax + an expert bias "
                "(moe_bias_rate > 0) without renormalising the gates (Ernie-4.5-MoE always does); export needs "
                "moe_norm_topk = true, moe_bias_rate = 0, or moe_router = 'sigmoid' (Glm4-MoE)")
        return ERNIE_MOE
    if mc.moe_every == 1 and not mc.moe_shared_experts and mc.moe_norm_topk:
        return MIXTRAL
    return QWEN2_MOE


def _names(fmt: str) -> dict:
    """Our per-expert tensors' names in the format (under model.layers.N.)."""
    if fmt == MIXTRAL:
        return {"block": "block_sparse_moe", "router": "gate", "gate": "w1", "up": "w3", "down": "w2"}
    return {"block": "mlp", "router": "gate", "gate": "gate_proj", "up": "up_proj", "down": "down_proj",
            "shared": "shared_expert" if fmt == QWEN2_MOE else "shared_experts"}


def _ernie_attention(k: str, v: torch.Tensor, mc) -> tuple[str, torch.Tensor] | None:
    """Ernie's RoPE is ours (interleaved pairs): q and k keep their row order (muP's q fold stays)."""
    if k.endswith(Q_WEIGHT):
        return hf_name(k), (v * q_fold(mc) if q_fold(mc) != 1.0 else v).detach().contiguous()
    if k.endswith(K_WEIGHT):
        return hf_name(k), v.detach().contiguous()
    return llama_tensor(k, v, mc)


def moe_to_hf(sd: dict, mc) -> dict:
    """Our full state dict -> the format's tensors (contiguous, HF's [out, in] per expert)."""
    fmt = moe_format(mc)
    n = _names(fmt)
    out = {}
    for k, v in sd.items():
        v = v.detach()
        parts = k.split(".")
        moe_layer = parts[0] == M.BLOCKS and parts[2] == M.FEED_FORWARD and mc.is_moe_layer(int(parts[1]))
        if not moe_layer:
            pair = (_ernie_attention if fmt == ERNIE_MOE else llama_tensor)(k, v, mc)
            if pair is not None:
                out[pair[0]] = pair[1]
            continue
        block = f"model.layers.{parts[1]}.{n['block']}"
        rest = ".".join(parts[3:])
        if rest == "router.weight":
            out[f"{block}.{n['router']}.weight"] = v.contiguous()
        elif rest == "expert_bias":
            if fmt == GLM4_MOE:
                out[f"{block}.gate.e_score_correction_bias"] = v.float().contiguous()
            elif fmt == ERNIE_MOE:          # one expert group: [1, E]
                out[f"{block}.gate.moe_statics.e_score_correction_bias"] = v.float()[None].contiguous()
        elif rest.startswith("experts."):
            which = {"w1": "gate", "w3": "up", "w2": "down"}[parts[4]]
            for e in range(mc.moe_experts):      # ours [in, out] per expert; HF's Linear is [out, in]
                out[f"{block}.experts.{e}.{n[which]}.weight"] = v[e].t().contiguous()
        elif rest.startswith("shared."):
            which = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[parts[4]]
            if fmt == QWEN2_MOE and which == "down_proj":
                v = v * SHARED_GATE_FOLD
            out[f"{block}.{n['shared']}.{which}.weight"] = v.contiguous()
        else:
            raise CheckpointError(f"{k}: a MoE tensor the Hugging Face export does not know")
    if fmt in (QWEN2_MOE, GLM4_MOE) and not mc.moe_shared_experts:     # the format's shared expert, width 0
        for i in moe_layers(mc):
            block = f"model.layers.{i}.mlp.{n['shared']}"
            out[f"{block}.gate_proj.weight"] = out[f"{block}.up_proj.weight"] = torch.zeros(0, mc.dim)
            out[f"{block}.down_proj.weight"] = torch.zeros(mc.dim, 0)
    if fmt == QWEN2_MOE:
        for i in moe_layers(mc):
            out[f"model.layers.{i}.mlp.shared_expert_gate.weight"] = torch.zeros(1, mc.dim)
    return out


def moe_hf_config(mc, dtype: str = "float32") -> dict:
    fmt = moe_format(mc)
    cfg = {k: v for k, v in hf_config_dense(mc, dtype).items() if k not in ("attention_bias", "mlp_bias")}
    cfg.update(architectures=[ARCHITECTURES[fmt]], model_type=fmt, num_experts_per_tok=mc.moe_top_k,
               output_router_logits=False)
    shared = mc.moe_shared_experts * mc.expert_hidden
    if fmt == MIXTRAL:
        cfg.update(num_local_experts=mc.moe_experts, intermediate_size=mc.expert_hidden, sliding_window=None,
                   router_jitter_noise=0.0)
    elif fmt == QWEN2_MOE:
        cfg.update(num_experts=mc.moe_experts, moe_intermediate_size=mc.expert_hidden, intermediate_size=mc.hidden,
                   shared_expert_intermediate_size=shared, decoder_sparse_step=mc.moe_every, mlp_only_layers=[],
                   norm_topk_prob=mc.moe_norm_topk, qkv_bias=False, use_sliding_window=False)
    elif fmt == ERNIE_MOE:
        cfg.update(moe_num_experts=mc.moe_experts, moe_k=mc.moe_top_k, moe_intermediate_size=mc.expert_hidden,
                   intermediate_size=mc.hidden, moe_num_shared_experts=mc.moe_shared_experts, moe_layer_start_index=0,
                   moe_layer_end_index=mc.n_layers - 1, moe_layer_interval=mc.moe_every, moe_norm_min=NORM_MIN,
                   use_bias=False)
    else:
        cfg.update(n_routed_experts=mc.moe_experts, moe_intermediate_size=mc.expert_hidden, intermediate_size=mc.hidden,
                   n_shared_experts=mc.moe_shared_experts, first_k_dense_replace=moe_layers(mc)[0],
                   norm_topk_prob=mc.moe_norm_topk, routed_scaling_factor=1.0, n_group=1, topk_group=1,
                   use_qk_norm=False, attention_bias=False, partial_rotary_factor=1.0, num_nextn_predict_layers=0)
        if not mc.moe_shared_experts:        # Glm4-MoE sizes its shared expert as moe width x count: 0
            cfg["n_shared_experts"] = 0
    return cfg


def hf_config_dense(mc, dtype: str) -> dict:
    """Llama's config keys for the shared parts (attention, norms, RoPE, vocabulary)."""
    return hf_config(replace(mc, moe_experts=0), dtype)


def to_hf_any(sd: dict, mc) -> dict:
    """Tensors of the Hugging Face format of this model: Llama (dense) or an MoE format above."""
    return moe_to_hf(sd, mc) if mc.moe_experts else to_hf(sd, mc)


def hf_config_any(mc, dtype: str = "float32") -> dict:
    return moe_hf_config(mc, dtype) if mc.moe_experts else hf_config(mc, dtype)


def check_exportable(mc) -> None:
    moe_format(mc) if mc.moe_experts else check_llama_shaped(mc)
