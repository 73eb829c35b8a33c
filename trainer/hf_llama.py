"""Our Transformer's weights <-> Hugging Face Llama (`LlamaForCausalLM`) weights and config.

Names: tok_embeddings -> model.embed_tokens, layers.N.attention.w{q,k,v,o} -> model.layers.N.
self_attn.{q,k,v,o}_proj, feed_forward.w1/w3/w2 -> mlp.gate_proj/up_proj/down_proj, attention_norm ->
input_layernorm, ffn_norm -> post_attention_layernorm, norm -> model.norm, output -> lm_head.
RoPE: ours rotates interleaved pairs (x[2i], x[2i+1]); HF's rotate_half pairs x[i] with x[i+d/2].
Permuting the rows of wq and wk within each head (as Meta's convert_llama_weights_to_hf does)
makes HF's convention compute the same attention scores.
muP (model.parametrization = "mup") multiplies the logits by 1/m and scales attention scores by
sqrt(base head dim)/head_dim; HF Llama has neither multiplier (its scores use 1/sqrt(head_dim)), so
export folds them into the weights: lm_head = output_mult x our head, q_proj = (our scale x
sqrt(head_dim)) x our wq; an import divides them out again. A tied muP head cannot be folded into
the shared matrix without changing the embedding, so it is written untied (lm_head = E / m,
tie_word_embeddings false); on import a tied model takes its matrix from embed_tokens.
Sliding-window attention (model.attn_window, every layer windowed) is written as Mistral
(`MistralForCausalLM`, the same tensor names as Llama plus `sliding_window`, whose rule
q - k < sliding_window is ours). With global layers (attn_global_every) it is Qwen2
(`Qwen2ForCausalLM`, whose `layer_types` name each layer sliding or full): Qwen2's q/k/v
projections always carry biases, so the export writes them as zeros and an import requires them
to be zero (our model has none).
Document masking (model.doc_mask) is a property of how packed rows were trained, not of the
weights: an exported model run on one document at a time computes what ours does.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from trainer import model_plan as M
from trainer.checkpoint_state import CheckpointError, expected_model_shapes
from trainer.rope_scaling import hf_rope_parameters

# Our module names come from trainer/model_plan.py (the one place that names the model's modules).
LAYER_NAMES = {f"{ours}.weight": f"{theirs}.weight" for ours, theirs in (
    (M.Q, "self_attn.q_proj"), (M.K, "self_attn.k_proj"), (M.V, "self_attn.v_proj"), (M.O, "self_attn.o_proj"),
    (M.GATE, "mlp.gate_proj"), (M.UP, "mlp.up_proj"), (M.DOWN, "mlp.down_proj"),
    (M.ATTENTION_NORM, "input_layernorm"), (M.FFN_NORM, "post_attention_layernorm"))}
TOP_NAMES = {f"{M.EMBEDDING}.weight": "model.embed_tokens.weight", f"{M.FINAL_NORM}.weight": "model.norm.weight",
             f"{M.HEAD}.weight": "lm_head.weight"}
Q_WEIGHT, K_WEIGHT, HEAD_WEIGHT, EMBEDDING_WEIGHT = f"{M.Q}.weight", f"{M.K}.weight", f"{M.HEAD}.weight", f"{M.EMBEDDING}.weight"


def llama_problems(mc) -> list[str]:
    """What keeps the attention, norms and MLPs from Llama's form (the MoE formats share it)."""
    if mc.position == "relative":   # no Llama (nor other decoder format transformers loads) has T5's bias table
        raise CheckpointError("model.position = 'relative' cannot be exported: Hugging Face Llama has no learned "
                              "relative bias (T5's format is encoder-decoder); train with model.position = 'rope' "
                              "(with model.rope_scaling for long context) to export")
    wrong = [f"model.{field} = {getattr(mc, field)!r} (Llama needs {want!r})"
             for field, want in (("position", "rope"), ("norm", "rmsnorm"), ("norm_position", "pre"),
                                 ("activation", "swiglu"), ("bias", False)) if getattr(mc, field) != want]
    return wrong


def check_llama_shaped(mc) -> None:
    wrong = llama_problems(mc)
    if getattr(mc, "moe_experts", 0):     # MoE models go to the MoE formats of trainer/hf_moe.py (export only)
        wrong.append(f"model.moe_experts = {mc.moe_experts} (Llama is dense: 0)")
    if wrong:
        raise CheckpointError("only Llama-shaped models (rope, rmsnorm, pre-norm, swiglu, no bias) can be exported "
                              "to or imported from Hugging Face Llama; this model has " + "; ".join(wrong))


def q_fold(mc) -> float:
    """Our attention scale over HF's 1/sqrt(head_dim): 1 under sp, folded into q_proj under muP."""
    return 1.0 if mc.attn_scale is None else mc.attn_scale * mc.head_dim ** 0.5


def untied_head(mc) -> bool:
    """A tied head whose logit multiplier is not 1 is exported as its own lm_head."""
    return mc.tie_embeddings and mc.output_mult != 1.0


def hf_name(ours: str) -> str:
    if ours in TOP_NAMES:
        return TOP_NAMES[ours]
    _, n, rest = ours.split(".", 2)
    return f"model.layers.{n}.{LAYER_NAMES[rest]}"


def _rope_permute(w: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """Rows of one projection, per head: interleaved pair order <-> rotate-half order."""
    out_dim, in_dim = w.shape
    hd = out_dim // n_heads
    if not inverse:
        return w.view(n_heads, hd // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
    return w.view(n_heads, 2, hd // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def to_hf(sd: dict, mc) -> dict:
    """Our full state dict -> HF Llama tensors (contiguous; the tied head is left out, as HF does)."""
    check_llama_shaped(mc)
    pairs = (llama_tensor(k, v, mc) for k, v in sd.items())
    out = dict(p for p in pairs if p is not None)
    if qwen2_layers(mc):
        out.update({k: b.to(next(iter(out.values())).dtype) for k, b in zero_qkv_biases(mc).items()})
    return out


def llama_tensor(k: str, v: torch.Tensor, mc) -> tuple[str, torch.Tensor] | None:
    """One of our non-expert tensors in HF Llama's name and form; None for a tied head HF leaves out."""
    if k == HEAD_WEIGHT and mc.tie_embeddings and not untied_head(mc):
        return None
    if k.endswith(Q_WEIGHT):
        v = _rope_permute(v, mc.n_heads)
        if q_fold(mc) != 1.0:
            v = v * q_fold(mc)
    elif k.endswith(K_WEIGHT):
        v = _rope_permute(v, mc.kv_heads)
    elif k == HEAD_WEIGHT and mc.output_mult != 1.0:
        v = v * mc.output_mult
    return hf_name(k), v.detach().contiguous()


def qwen2_layers(mc) -> bool:
    """A windowed model with global layers: written as Qwen2 (per-layer types)."""
    return bool(getattr(mc, "attn_window", 0) and getattr(mc, "attn_global_every", 0))


def layer_types(mc) -> list[str]:
    return ["full_attention" if mc.layer_window(i) is None else "sliding_attention" for i in range(mc.n_layers)]


def zero_qkv_biases(mc) -> dict:
    """Qwen2's q/k/v biases, zero: the export's extra tensors that change nothing."""
    return {f"model.layers.{i}.self_attn.{n}_proj.bias": torch.zeros(heads * mc.head_dim)
            for i in range(mc.n_layers) for n, heads in (("q", mc.n_heads), ("k", mc.kv_heads), ("v", mc.kv_heads))}


def hf_config(mc, dtype: str = "float32") -> dict:
    check_llama_shaped(mc)
    window = getattr(mc, "attn_window", 0)
    if qwen2_layers(mc):
        arch = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "use_sliding_window": True,
                "sliding_window": window, "max_window_layers": 0, "layer_types": layer_types(mc)}
    elif window:
        arch = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": window}
    else:
        arch = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    return {
        **arch,
        "vocab_size": mc.vocab_size, "hidden_size": mc.dim, "intermediate_size": mc.hidden,
        "num_hidden_layers": mc.n_layers, "num_attention_heads": mc.n_heads, "num_key_value_heads": mc.kv_heads,
        "head_dim": mc.head_dim, "hidden_act": "silu", "max_position_embeddings": mc.max_seq_len,
        "rms_norm_eps": mc.norm_eps, "rope_theta": mc.rope_theta, "tie_word_embeddings": mc.tie_embeddings and not untied_head(mc),
        "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": mc.init_std,
        "torch_dtype": dtype, "use_cache": True,
        # transformers 5 reads rope_parameters (4.x's rope_scaling, with rope_theta beside it)
        "rope_parameters": hf_rope_parameters(mc),
    }


def check_hf_config(config: dict, mc, where: str) -> None:
    mine = hf_config(mc)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "rope_theta", "tie_word_embeddings")
    diffs = [f"{k}: {where} has {config.get(k)!r}, this run's model.* gives {mine[k]!r}"
             for k in keys if k in config and config[k] != mine[k]]
    if (config.get("sliding_window") or 0) != (getattr(mc, "attn_window", 0) or 0):
        diffs.append(f"sliding_window: {where} has {config.get('sliding_window')!r}, this run's model.attn_window "
                     f"gives {getattr(mc, 'attn_window', 0) or None!r}")
    # A model without RoPE scaling may be continued with one (context extension, as on resume); one
    # trained with a scaling must keep it (else its positions silently mean something else).
    theirs = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if _scaling_of(theirs) and _scaling_of(theirs) != _scaling_of(mine["rope_parameters"]):
        diffs.append(f"rope_parameters: {where} has {_scaling_of(theirs)!r}, this run's model.rope_* give "
                     f"{_scaling_of(mine['rope_parameters'])!r}")
    if diffs:
        raise CheckpointError("the exported model's config differs from this run's model config:\n  " + "\n  ".join(diffs))


def _scaling_of(params: dict) -> dict:
    """The RoPE scaling keys of a rope_parameters / rope_scaling dict (rope_theta is compared apart)."""
    kind = params.get("rope_type", params.get("type", "default"))
    return {} if kind == "default" else {k: v for k, v in params.items() if k not in ("rope_theta", "type")}


def find_weights_files(path: Path) -> list[Path]:
    """A .safetensors file, or the *.safetensors files of an export folder; [] for anything else."""
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if path.is_dir() and not (path / ".metadata").exists():
        return sorted(path.glob("*.safetensors"))
    return []


class WeightsReader:
    """Tensors of safetensors files in our names, read one at a time (never unpickles): a rank
    loading `checkpoint.init_from` reads each full tensor it needs once and keeps its shard
    (parallel/sharded_init.py), so its memory grows by one tensor, not by the model. Names and
    shapes are checked from the files' headers before any data is read; HF names are converted
    and an export folder's config.json is checked against the model config first."""

    def __init__(self, files: list[Path], mc):
        from safetensors import safe_open
        self.files = [Path(f) for f in files]
        self.mc = mc
        config = self.files[0].parent / "config.json"
        if config.is_file():
            check_hf_config(json.loads(config.read_text()), mc, str(config))
        self._handles = [safe_open(str(f), framework="pt") for f in self.files]
        self._where = {k: h for h in self._handles for k in h.keys()}
        self.hf = "model.embed_tokens.weight" in self._where
        self.want = expected_model_shapes(mc)
        self._check()

    def _shape(self, name: str) -> tuple:
        return tuple(self._where[name].get_slice(name).get_shape())

    def _stored_name(self, ours: str) -> str:
        if self.hf:
            return hf_name(EMBEDDING_WEIGHT if ours == HEAD_WEIGHT and self.mc.tie_embeddings else ours)
        return ours

    def _check(self) -> None:
        if self.hf:
            check_llama_shaped(self.mc)
            names = {hf_name(k): k for k in self.want}
            if self.mc.tie_embeddings:
                names.pop("lm_head.weight", None)
            problems = [f"missing: {theirs}" for theirs in names if theirs not in self._where]
            problems += [f"shape of {theirs}: file {list(self._shape(theirs))}, this model {list(self.want[ours])}"
                         for theirs, ours in names.items() if theirs in self._where and self._shape(theirs) != self.want[ours]]
            zero_ok = zero_qkv_biases(self.mc) if qwen2_layers(self.mc) else {}
            problems += [f"not in this model: {k}" for k in self._where
                         if k not in names and k not in zero_ok and not (k == "lm_head.weight" and self.mc.tie_embeddings)]
            problems += [f"{k}: not zero (this model has no attention biases)" for k in zero_ok
                         if k in self._where and self._where[k].get_tensor(k).abs().max().item() != 0]
            if problems:
                raise CheckpointError("the weights do not fit this model (check model.* against the export's "
                                      "config.json):\n  " + "\n  ".join(problems[:12]))
            return
        problems = [f"missing: {k}" for k in self.want if k not in self._where]
        problems += [f"not in this model: {k}" for k in self._where if k not in self.want]
        problems += [f"shape of {k}: file {list(self._shape(k))}, this model {list(self.want[k])}"
                     for k in self.want if k in self._where and self._shape(k) != self.want[k]]
        if problems:
            raise CheckpointError(f"weights {[str(f) for f in self.files]} do not fit this model:\n  "
                                  + "\n  ".join(problems[:12]))

    def tensor(self, ours: str) -> torch.Tensor:
        """The full tensor of parameter `ours`, as the file holds it (dtype included)."""
        name = self._stored_name(ours)
        v = self._where[name].get_tensor(name)
        if self.hf and ours.endswith(Q_WEIGHT):
            v = _rope_permute(v, self.mc.n_heads, inverse=True)
            if q_fold(self.mc) != 1.0:
                v = v / q_fold(self.mc)
        elif self.hf and name == "lm_head.weight" and self.mc.output_mult != 1.0:
            v = v / self.mc.output_mult
        elif self.hf and ours.endswith(K_WEIGHT):
            v = _rope_permute(v, self.mc.kv_heads, inverse=True)
        return v

    def value(self, fqn: str, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """parallel.sharded_init's ValueFn: the tensor converted to the parameter's device and dtype."""
        return self.tensor(fqn).to(device=device, dtype=dtype)


def load_weights(files: list[Path], mc) -> dict:
    """Full state dict in our names from safetensors (all tensors at once: for export and tests;
    training loads through WeightsReader one tensor at a time)."""
    reader = WeightsReader(files, mc)
    return {k: reader.tensor(k) for k in reader.want}
