"""The model's shape as configuration, with its parameter count and training FLOPs per token.

Counting is analytic (from the shape alone) so that the layout planner, the scaling sweeps and the
metrics can all ask "how big / how expensive is this model" without building it. The model itself
(`trainer.model.Transformer`) checks its real parameter count against `num_params` in the tests.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option


# An automatic vocabulary is padded to a multiple of 64: matmul-friendly widths (GPT-2's 50257 -> 50304),
# and divisible by the usual tensor-parallel sizes for the vocab-parallel head.
VOCAB_MULTIPLE = 64
BYTE_TOKENIZER_IDS = 257    # data.tokenizer = 'bytes': ids 0..255 are the bytes, 256 is end-of-text


def padded_vocab(tokenizer_ids: int) -> int:
    """The automatic model.vocab_size for a tokenizer of `tokenizer_ids` ids."""
    return -(-tokenizer_ids // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def known_tokenizer_eot(tokenizer: str) -> int | None:
    """A tokenizer's end-of-text id when its name alone tells it: 'bytes' only (256)."""
    return BYTE_TOKENIZER_IDS - 1 if tokenizer == "bytes" else None


def known_tokenizer_ids(tokenizer: str) -> int | None:
    """A tokenizer's id count when its name alone tells it (no file to read): 'bytes' only."""
    return BYTE_TOKENIZER_IDS if tokenizer == "bytes" else None


@dataclass
class ModelConfig:
    vocab_size: int = option("vocabulary size (>= the tokenizer's); 0 = auto: the tokenizer's vocabulary rounded up "
                             f"to a multiple of {VOCAB_MULTIPLE} (the byte tokenizer's 257 ids: 320)", 0)
    dim: int = option("model width (hidden size)", 128)
    n_layers: int = option("number of Transformer blocks", 4)
    n_heads: int = option("attention (query) heads", 4)
    n_kv_heads: int | None = option("key/value heads: = n_heads (MHA), 1 < k < n_heads (GQA), 1 (MQA); unset = n_heads", None)
    ffn_hidden: int = option("MLP hidden width; 0 = 4*dim for gelu, 8/3*dim rounded up to ffn_multiple_of for swiglu", 0)
    ffn_multiple_of: int = option("round the automatic swiglu width up to a multiple of this", 64)
    activation: Literal["swiglu", "gelu"] = option("MLP kind", "swiglu")
    norm: Literal["rmsnorm", "layernorm"] = option("normalisation layer", "rmsnorm")
    norm_position: Literal["pre", "post"] = option("pre-norm (GPT-2/Llama) or post-norm (original Transformer)", "pre")
    norm_eps: float = option("epsilon of the norm layers", 1e-5)
    position: Literal["rope", "alibi", "sinusoidal", "learned", "relative", "none"] = option(
        "position encoding; relative = T5's learned bucketed bias per head (one table per layer)", "rope")
    rope_theta: float = option("RoPE base frequency", 10000.0)
    rope_scaling: Literal["none", "llama3", "yarn"] = option(
        "RoPE context extension: stretch the frequencies by rope_factor beyond rope_original_max_len "
        "(Llama 3.1's rule or YaRN, as transformers computes them); may change when resuming", "none")
    rope_factor: float = option("RoPE scaling: context extension factor (e.g. 8 = 512 -> 4096)", 8.0)
    rope_original_max_len: int = option("RoPE scaling: the sequence length the model was trained at", 0)
    rope_low_freq_factor: float = option("llama3 RoPE scaling: wavelengths above original_len / this are interpolated", 1.0)
    rope_high_freq_factor: float = option("llama3 RoPE scaling: wavelengths below original_len / this are kept", 4.0)
    rope_beta_fast: float = option("yarn RoPE scaling: rotations above which a dimension is kept", 32.0)
    rope_beta_slow: float = option("yarn RoPE scaling: rotations below which a dimension is interpolated", 1.0)
    rope_attention_factor: float = option("yarn RoPE scaling: cos/sin multiplier; 0 = 0.1 ln(rope_factor) + 1", 0.0)
    rel_buckets: int = option("relative position: buckets (half exact distances, half log-spaced)", 32)
    rel_max_distance: int = option("relative position: distances from this on share the last bucket", 128)
    doc_mask: bool = option("document masking of packed rows: a token attends only within its own document (each "
                            "ends with end-of-text) and positions restart at 0 after each end-of-text", False)
    eot_id: int = option("the end-of-text id that ends each document (doc_mask); -1 = the tokenizer's", -1)
    attn_window: int = option("sliding-window (local) attention: each token sees its last N positions, itself "
                              "included (Mistral's sliding_window); 0 = full causal attention", 0)
    attn_global_every: int = option("with attn_window: every k-th block (k-1, 2k-1, ...) attends globally, the "
                                    "others locally (Gemma); 0 = every block windowed", 0)
    max_seq_len: int = option("longest sequence (size of learned/sinusoidal tables and the RoPE cache)", 2048)
    tie_embeddings: bool = option("share the input embedding with the output head", False)
    bias: bool = option("biases in linear and norm layers (GPT-2 style)", False)
    init_std: float = option("std of the normal initialisation", 0.02)
    moe_experts: int = option("routed experts per MoE block; 0 = a dense MLP in every block", 0)
    moe_top_k: int = option("experts each token is routed to", 2)
    moe_shared_experts: int = option("always-on experts of width moe_hidden per MoE block (DeepSeek)", 0)
    moe_every: int = option("every n-th block is MoE (blocks n-1, 2n-1, ...); 1 = all", 1)
    moe_hidden: int = option("hidden width of one expert (fine-grained experts: below the dense width); 0 = the "
                             "dense MLP width", 0)
    moe_router: Literal["softmax", "sigmoid"] = option("router score: softmax over experts or per-expert sigmoid", "softmax")
    moe_norm_topk: bool = option("divide the top-k gate weights by their sum", True)
    moe_aux_coef: float = option("weight of the Switch/GShard load-balancing loss (0 = none)", 0.01)
    moe_z_coef: float = option("weight of the router z-loss (ST-MoE; 0 = none)", 0.001)
    moe_bias_rate: float = option("aux-loss-free balancing (DeepSeek-V3): expert bias step per optimizer step "
                                  "(0 = off; 1e-3 is theirs)", 0.0)
    moe_sinkhorn_iters: int = option(
        "balanced choice in training (Sinkhorn, as Megatron's 'sinkhorn' routing): each micro-batch's top-k is taken "
        "after this many Sinkhorn iterations equalise the experts' shares; gates and evaluation use the plain "
        "scores; 0 = off", 0)
    moe_sinkhorn_hard_steps: int = option(
        "with moe_sinkhorn_iters: price steps that then even the hard top-k counts (Sinkhorn evens the soft "
        "shares only), the most even kept; 0 = Sinkhorn alone, as Megatron", 16)
    moe_capacity_factor: float = option("tokens an expert takes: factor x tokens x top_k / experts, the rest "
                                        "dropped; 0 = dropless", 0.0)
    parametrization: Literal["sp", "mup"] = option(
        "sp (standard) or mup (maximal update, Yang et al. 2022: hyperparameters tuned at mup_base_dim transfer "
        "to wider models)", "sp")
    mup_base_dim: int = option("muP: the width hyperparameters were tuned at (width multiplier m = dim / mup_base_dim)", 0)
    mup_base_head_dim: int = option(
        "muP: head dim at the base width, for the attention scale sqrt(base)/head_dim; 0 = head_dim / m "
        "(heads fixed, widening grows each head); set it to head_dim when widening adds heads", 0)

    # ---- derived shape -------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        if self.activation == "gelu":
            return 4 * self.dim
        m = self.ffn_multiple_of
        return -(-int(8 * self.dim / 3) // m) * m

    @property
    def expert_hidden(self) -> int:
        return self.moe_hidden or self.hidden

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of block `layer`, None where it attends to every earlier position."""
        if not self.attn_window:
            return None
        k = self.attn_global_every
        return None if k and layer % k == k - 1 else self.attn_window

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe_experts > 0 and layer % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layers))

    # ---- muP (Tensor Programs V, Table 3, in the form of Microsoft's `mup` package) ----------
    # Every factor is 1 under sp and at the base width, so a base-width muP model IS the sp model.
    @property
    def width_mult(self) -> float:
        """m = dim / mup_base_dim (1 under sp)."""
        return self.dim / self.mup_base_dim if self.parametrization == "mup" else 1.0

    @property
    def hidden_init_mult(self) -> float:
        """Hidden matrices' init std is init_std / sqrt(m): variance 1/fan_in, as muP needs."""
        return self.width_mult ** -0.5

    @property
    def hidden_lr_mult(self) -> float:
        """Adam LR of hidden matrices is lr / m; embeddings, the readout, norms and biases keep lr."""
        return 1.0 / self.width_mult

    @property
    def output_mult(self) -> float:
        """Logits are multiplied by 1/m (mup's MuReadout; the readout weight keeps sp's init and lr)."""
        return 1.0 / self.width_mult

    @property
    def attn_scale(self) -> float | None:
        """Scale of q.k: None = SDPA's 1/sqrt(head_dim) (sp); muP uses sqrt(base head dim)/head_dim,
        which is 1/head_dim up to a constant and equals sp's at the base width."""
        if self.parametrization != "mup":
            return None
        base = self.mup_base_head_dim or self.head_dim / self.width_mult
        return base ** 0.5 / self.head_dim

    def validate(self) -> None:
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size: must be >= 0 (0 = follow the tokenizer), got {self.vocab_size}")
        for name in ("dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name}: must be a positive integer, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"model.dim: {self.dim} is not divisible by model.n_heads={self.n_heads}")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"model.n_kv_heads: {self.kv_heads} must divide model.n_heads={self.n_heads} "
                "(n_heads for MHA, a divisor for GQA, 1 for MQA)")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"model.position: rope needs an even head dim, got dim/n_heads={self.head_dim}")
        if self.ffn_hidden < 0 or self.ffn_multiple_of < 1:
            raise ValueError("model.ffn_hidden must be >= 0 and model.ffn_multiple_of >= 1")
        if self.norm_eps <= 0 or self.init_std <= 0:
            raise ValueError("model.norm_eps and model.init_std must be > 0")
        if self.parametrization == "mup" and self.mup_base_dim < 1:
            raise ValueError(f"model.mup_base_dim: must be >= 1 with parametrization = 'mup' (the width the "
                             f"hyperparameters were tuned at, e.g. 64), got {self.mup_base_dim}")
        if self.mup_base_head_dim < 0:
            raise ValueError(f"model.mup_base_head_dim: must be >= 0 (0 = head_dim * mup_base_dim / dim), "
                             f"got {self.mup_base_head_dim}")
        if self.rope_theta <= 0:    # the RoPE frequencies are rope_theta ** (-2i/d): inf or nan otherwise
            raise ValueError(f"model.rope_theta: must be > 0 (10000 is usual), got {self.rope_theta}")
        self._validate_positions()
        self._validate_attention_mask()
        self._validate_moe()

    def _validate_positions(self) -> None:
        if self.position == "relative":
            if self.rel_buckets < 2:
                raise ValueError(f"model.rel_buckets: must be >= 2 (32 is T5's), got {self.rel_buckets}")
            if self.rel_max_distance <= self.rel_buckets // 2:
                raise ValueError(f"model.rel_max_distance: must exceed model.rel_buckets / 2 = {self.rel_buckets // 2} "
                                 f"(the exact buckets; 128 is T5's), got {self.rel_max_distance}")
        if self.rope_scaling == "none":
            return
        if self.position != "rope":
            raise ValueError(f"model.rope_scaling: {self.rope_scaling!r} needs model.position = 'rope', got "
                             f"{self.position!r}; set model.rope_scaling = 'none'")
        if self.rope_factor < 1:
            raise ValueError(f"model.rope_factor: must be >= 1 (new length / trained length), got {self.rope_factor}")
        if self.rope_original_max_len < 1:
            raise ValueError("model.rope_original_max_len: must be set with model.rope_scaling (the sequence length "
                             f"the model was trained at, e.g. 512), got {self.rope_original_max_len}")
        if self.rope_scaling == "llama3" and not 0 < self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError("model.rope_high_freq_factor: must exceed model.rope_low_freq_factor > 0 (Llama 3.1: 4 and "
                             f"1), got {self.rope_high_freq_factor} and {self.rope_low_freq_factor}")
        if self.rope_scaling == "yarn" and not 0 < self.rope_beta_slow < self.rope_beta_fast:
            raise ValueError("model.rope_beta_fast: must exceed model.rope_beta_slow > 0 (YaRN: 32 and 1), got "
                             f"{self.rope_beta_fast} and {self.rope_beta_slow}")
        if self.rope_attention_factor < 0:
            raise ValueError(f"model.rope_attention_factor: must be >= 0 (0 = automatic), got {self.rope_attention_factor}")

    def _validate_attention_mask(self) -> None:
        if self.attn_window < 0:
            raise ValueError(f"model.attn_window: must be >= 0 (0 = full attention; e.g. 256 positions), "
                             f"got {self.attn_window}")
        if self.attn_global_every < 0 or (self.attn_global_every and not self.attn_window):
            raise ValueError(f"model.attn_global_every: must be >= 0 and needs model.attn_window > 0 (every k-th "
                             f"block global, the others windowed), got {self.attn_global_every} with "
                             f"attn_window = {self.attn_window}")
        if self.eot_id < -1 or (self.vocab_size and self.eot_id >= self.vocab_size):
            raise ValueError(f"model.eot_id: must be -1 (the tokenizer's) or an id below model.vocab_size = "
                             f"{self.vocab_size}, got {self.eot_id}")

    def _validate_moe(self) -> None:
        if self.moe_experts < 0:
            raise ValueError(f"model.moe_experts: must be >= 0 (0 = dense), got {self.moe_experts}")
        if not self.moe_experts:
            return
        if not 1 <= self.moe_top_k <= self.moe_experts:
            raise ValueError(f"model.moe_top_k: must be between 1 and model.moe_experts = {self.moe_experts}, "
                             f"got {self.moe_top_k}")
        if self.moe_every < 1 or self.moe_every > self.n_layers:
            raise ValueError(f"model.moe_every: must be between 1 and model.n_layers = {self.n_layers} "
                             f"(else no block is MoE), got {self.moe_every}")
        if self.moe_hidden < 0 or self.moe_shared_experts < 0:
            raise ValueError("model.moe_hidden and model.moe_shared_experts must be >= 0")
        for name in ("moe_aux_coef", "moe_z_coef", "moe_bias_rate", "moe_capacity_factor", "moe_sinkhorn_iters",
                     "moe_sinkhorn_hard_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"model.{name}: must be >= 0, got {getattr(self, name)}")
        if self.moe_sinkhorn_iters and self.moe_bias_rate:
            raise ValueError("model.moe_sinkhorn_iters: the Sinkhorn choice balances each micro-batch itself, so the "
                             "expert bias would learn nothing; set model.moe_bias_rate = 0 (or moe_sinkhorn_iters = 0)")
        if self.bias:
            raise ValueError("model.bias: experts have no biases; set model.bias = false with model.moe_experts > 0")
        if self.parametrization == "mup":   # the router (fan-out = experts, fixed) needs muP's readout rules: not done
            raise ValueError("model.parametrization: 'mup' with model.moe_experts > 0 is not supported yet; use 'sp'")

    def _mlp_params(self, hidden: int) -> int:
        return (3 if self.activation == "swiglu" else 2) * self.dim * hidden

    # ---- counts ----------------------------------------------------------------------------
    def _layer_matmul_params(self, layer: int = 0, active: bool = False) -> int:
        """Matmul weights of block `layer`; `active`: only those one token uses (top-k experts)."""
        d, hd = self.dim, self.head_dim
        attn = d * self.n_heads * hd * 2 + d * self.kv_heads * hd * 2        # wq, wo, wk, wv
        if not self.is_moe_layer(layer):
            return attn + self._mlp_params(self.hidden)
        routed = self.moe_top_k if active else self.moe_experts
        experts = (routed + self.moe_shared_experts) * self._mlp_params(self.expert_hidden)
        return attn + self.moe_experts * d + experts                          # + the router

    def _norm_params(self) -> int:
        return self.dim * (2 if (self.norm == "layernorm" and self.bias) else 1)

    def _layer_other_params(self) -> int:
        """Norm weights and biases: parameters that take part in no matmul."""
        n = 2 * self._norm_params()
        if self.position == "relative":
            n += self.rel_buckets * self.n_heads      # the layer's bias table
        if self.bias:
            hd = self.head_dim
            n += self.n_heads * hd + 2 * self.kv_heads * hd + self.dim  # q, k, v, o biases
            n += (2 if self.activation == "swiglu" else 1) * self.hidden + self.dim
        return n

    def num_params(self, include_embedding: bool = True, active: bool = False) -> int:
        """Parameter count. Without embeddings: no token/position tables and no output head
        (Kaplan et al.'s N); with them: every distinct tensor, a tied head counted once.
        `active`: a MoE model's parameters one token uses (its top-k routed experts)."""
        body = sum(self._layer_matmul_params(i, active) for i in range(self.n_layers))
        body += self.n_layers * self._layer_other_params() + self._norm_params()
        if not include_embedding:
            return body
        emb = self.vocab_size * self.dim
        if self.position == "learned":
            emb += self.max_seq_len * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return body + emb + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6 x (weights used in
        matmuls, the output head included) + 12 * L * H * Q * T for attention scores and values.
        Counts the full T x T attention, as torch's flop counter does for SDPA. A MoE block counts
        its router and the top-k experts a token uses (dropless), not all experts: MFU stays honest."""
        matmul = sum(self._layer_matmul_params(i, active=True) for i in range(self.n_layers)) + self.vocab_size * self.dim
        attn = 12 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return float(6 * matmul + attn)
