"""A decoder-only Transformer whose design choices are switches in `ModelConfig`.

No parallel code lives here. The structure follows torchtitan so that parallel/ can wrap it from
outside: `layers` is a ModuleDict (pipeline stages delete entries and keep the others' names),
attention derives its local head count from the projected width (tensor parallel shards wq/wk/wv
column-wise and nothing here changes), and any of `tok_embeddings`, `norm`, `output` may be set to
None by a pipeline split (a middle stage receives and returns hidden states).
"""
from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from core.model_config import ModelConfig
from trainer import moe
from trainer.attention import AttentionCore, AttnMask, doc_ids
from trainer.relative_bias import RelativeBias
from trainer.rope_scaling import rope_cache


# ---- positions ------------------------------------------------------------------------------

def apply_rope(x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x [B, T, H, D] by the angles in cache [T, D/2, 2] (or [B, T, D/2, 2]: the
    angles of each row's own positions), in fp32 arithmetic whatever x's dtype.

    Written as x * (cos, cos) + swap(x) * (-sin, sin) over the pairs: the same products and sums as
    (x0 cos - x1 sin, x0 sin + x1 cos), so the result is bit for bit that formula's, in five passes
    over memory instead of nine (no fp32 copy of x, no stack: a bf16 x is widened inside the
    multiplies), and fewer in backward."""
    if cache.dim() == 3:
        cache = cache[None]
    cos, sin = cache[:, :, None, :, 0:1].float(), cache[:, :, None, :, 1:2].float()
    pairs = (x if x.dtype.itemsize <= 4 else x.float()).reshape(*x.shape[:-1], -1, 2)
    return (pairs * cos + pairs.flip(-1) * torch.cat([-sin, sin], dim=-1)).flatten(-2).type_as(x)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Press et al. 2022: geometric slopes; for a head count that is not a power of two,
    the closest power's slopes plus every other slope of the next one (their reference code)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_2(closest)
    if closest != n_heads:
        slopes += power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


def sinusoidal_table(max_len: int, dim: int, device=None) -> torch.Tensor:
    pos = torch.arange(max_len, device=device, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(max_len, dim, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


def param_generator(seed: int, fqn: str, device: torch.device) -> torch.Generator:
    """A generator of its own per parameter, seeded from (seed, name) by a stable hash (Python's
    hash() of a str changes between processes)."""
    digest = hashlib.blake2b(f"{seed}/{fqn}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") & (2 ** 63 - 1))


# ---- blocks ---------------------------------------------------------------------------------

def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """x as torch.autocast would hand it to each linear layer that reads it (unchanged outside
    autocast): casting a pre-norm's output once here, not once per reader (wq, wk, wv; w1, w3),
    saves three fp32 -> bf16 copies forward and their three bf16 -> fp32 copies backward per block.
    The readers see the same bf16 values; their input gradients are summed in bf16 instead of fp32."""
    device = x.device.type
    return x.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else x


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.dim, eps=cfg.norm_eps, bias=cfg.bias)


class KVCache:
    """Keys and values of earlier positions, per layer, for incremental decoding. A layer with a
    sliding window keeps only the last `window - 1` positions (all its next query can see), plus
    `keep_extra` for a caller that rolls back (speculative decoding), so its memory stays flat with
    length; a global layer keeps everything."""

    def __init__(self, keep_extra: int = 0):
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.first: dict[int, int] = {}     # absolute position of each layer's first cached entry
        self.keep_extra = keep_extra
        self.length = 0                     # positions fed so far
        self.windows: dict[int, int | None] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, window: int | None = None):
        """Append k/v [B, T, H, D]; returns (all keys, all values, position of the first) to attend
        to now, then forgets what no later query of a `window` layer can see."""
        first = self.first.get(layer, 0)
        self.windows[layer] = window
        if layer in self.k:
            k = torch.cat([self.k[layer], k], dim=1)
            v = torch.cat([self.v[layer], v], dim=1)
        end = first + k.shape[1]
        self.length = max(self.length, end)
        keep = k.shape[1] if window is None else min(k.shape[1], window - 1 + self.keep_extra)
        self.k[layer], self.v[layer] = k[:, k.shape[1] - keep:], v[:, k.shape[1] - keep:]
        self.first[layer] = end - keep
        return k, v, first

    def __len__(self) -> int:
        """Positions fed (cached or, in a windowed layer, seen and dropped)."""
        return self.length

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on: speculative decoding rolls back the keys and
        values of draft tokens the target rejected, so the next step overwrites them."""
        for d in (self.k, self.v):
            for layer, t in d.items():
                if length < self.first[layer]:
                    raise ValueError(f"KVCache.truncate: layer {layer} no longer holds position {length} "
                                     f"(keep_extra={self.keep_extra} is too small for this rollback)")
                d[layer] = t[:, :length - self.first[layer]]
        self.length = min(self.length, length)

    def attended(self) -> float:
        """Positions the newest query read, averaged over layers (a windowed layer reads at most its
        window): what a decode step streams from the cache, for the bandwidth estimate."""
        if not self.windows:
            return 0.0
        return sum(self.length if w is None else min(w, self.length) for w in self.windows.values()) / len(self.windows)

    def entries(self) -> int:
        """Key (= value) vectors held over all layers, per row: the cache's memory in positions."""
        return sum(t.shape[1] for t in self.k.values())


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.window = cfg.layer_window(layer_id)     # None: full causal attention
        self.head_dim = cfg.head_dim
        self.position = cfg.position
        self.scale = cfg.attn_scale         # None under sp: SDPA's own 1/sqrt(head_dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.bias)
        self.core = AttentionCore(cfg.attn_scale)   # context parallel swaps this (trainer/attention.py)
        if cfg.position == "alibi":
            # One slope per head; a tensor-parallel plan shards this buffer with the heads.
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.n_heads), persistent=False)
        # T5 bias table [buckets, heads]; a tensor-parallel plan shards it with the heads
        self.rel_bias = RelativeBias(cfg.rel_buckets, cfg.rel_max_distance, cfg.n_heads) \
            if cfg.position == "relative" else None

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None, start_pos: int = 0,
                cache: KVCache | None = None, positions: torch.Tensor | None = None,
                doc: torch.Tensor | None = None) -> torch.Tensor:
        """`positions`: the positions of x's tokens ([T] or [B, T]); None = start_pos,
        start_pos + 1, ... (`rope` is then already the angles of exactly those). `doc` [B, T]:
        the document index of each token (doc masking; positions are then per document)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        first = 0
        if cache is not None:
            k, v, first = cache.update(self.layer_id, k, v, self.window)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
        q_pos = positions if positions is not None else torch.arange(start_pos, start_pos + seqlen, device=x.device)
        k_pos = torch.arange(first, first + k.shape[2], device=x.device) if cache is not None else q_pos
        mask = AttnMask(q_pos, k_pos, getattr(self, "alibi_slopes", None) if self.position == "alibi" else None,
                        aligned=positions is None and (cache is None or start_pos == 0),
                        q_doc=doc, k_doc=doc, window=self.window, rel_bias=self.rel_bias)
        out = self.core(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig, hidden: int | None = None):
        super().__init__()
        hidden = hidden or cfg.hidden
        self.swiglu = cfg.activation == "swiglu"
        self.w1 = nn.Linear(cfg.dim, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=cfg.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.swiglu:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attention = Attention(cfg, layer_id)
        self.feed_forward = FeedForward(cfg) if not cfg.is_moe_layer(layer_id) else moe.MoE(
            cfg, FeedForward(cfg, cfg.moe_shared_experts * cfg.expert_hidden) if cfg.moe_shared_experts else None)
        self.attention_norm = make_norm(cfg)
        self.ffn_norm = make_norm(cfg)

    def forward(self, x, rope=None, start_pos: int = 0, cache: KVCache | None = None, positions=None, doc=None):
        if self.pre_norm:
            h = x + self.attention(autocast_input(self.attention_norm(x)), rope, start_pos, cache, positions, doc)
            normed = self.ffn_norm(h)
            # the dense MLP's two input linears share one cast (an MoE router may want more precision)
            return h + self.feed_forward(autocast_input(normed) if isinstance(self.feed_forward, FeedForward) else normed)
        h = self.attention_norm(x + self.attention(x, rope, start_pos, cache, positions, doc))
        return self.ffn_norm(h + self.feed_forward(h))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if not cfg.vocab_size:      # 0 = auto is resolved from the tokenizer first (trainer/vocab.py)
            raise ValueError("model.vocab_size: 0 (auto) must be resolved from the tokenizer before building the "
                             "model (trainer.vocab.resolve_vocab), or set a number")
        if cfg.doc_mask and cfg.eot_id < 0:
            raise ValueError("model.eot_id: -1 (the tokenizer's) must be resolved before building a doc_mask model "
                             "(trainer.vocab.resolve_vocab), or set the end-of-text id")
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.pos_embeddings = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position == "learned" else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, i) for i in range(cfg.n_layers)})
        self.norm = make_norm(cfg)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.register_buffer("rope", None, persistent=False)
        self.register_buffer("sinusoidal", None, persistent=False)
        self.init_buffers()
        self.init_weights()

    def init_buffers(self, device: torch.device | None = None) -> None:
        """(Re)compute the position buffers (RoPE, sinusoidal tables, ALiBi slopes) on `device`:
        they are not weights (not saved, not random), so a model built on the meta device gets
        them here before it is split, and sharding slices them like any tensor."""
        c = self.cfg
        self.rope = rope_cache(c, device) if c.position == "rope" else None
        self.sinusoidal = sinusoidal_table(c.max_seq_len, c.dim, device) if c.position == "sinusoidal" else None
        for layer in self.layers.values():
            if hasattr(layer.attention, "alibi_slopes"):
                layer.attention.alibi_slopes = alibi_slopes(c.n_heads).to(device or layer.attention.alibi_slopes.device)
            if isinstance(layer.feed_forward, moe.MoE):    # expert biases start at 0 (a checkpoint restores them)
                layer.feed_forward.reset_state(device)

    def initial_value(self, fqn: str, shape: torch.Size, device: torch.device, dtype: torch.dtype, *,
                      seed: int) -> torch.Tensor:
        """The full initial tensor of parameter `fqn` (a name of the whole model): norm weights 1,
        biases 0, every matrix normal(0, init_std), residual projections (wo, w2) with std scaled
        by 1/sqrt(2 n_layers) (GPT-2); under muP the blocks' matrices (hidden weights) by a further
        1/sqrt(width multiplier), so their variance goes as 1/fan_in. Drawn from a generator of its own, seeded from (seed, fqn),
        so the value depends on nothing but the seed and the name: not on which parameters a
        pipeline stage holds nor on the order they are filled in (parallel/sharded_init.py
        materialises each rank's shards from it)."""
        if len(shape) == 1:
            return (torch.zeros if fqn.endswith("bias") else torch.ones)(shape, device=device, dtype=dtype)
        c = self.cfg
        residual = fqn.endswith(("wo.weight", "w2.weight", "experts.w2"))   # experts.w2: [E, h, dim]
        std = c.init_std / math.sqrt(2 * c.n_layers) if residual else c.init_std
        if fqn.startswith("layers.") and ".rel_bias." not in fqn:   # a bias table, not a hidden matrix
            std *= c.hidden_init_mult
        return torch.empty(shape, device=device, dtype=dtype).normal_(0.0, std, generator=param_generator(seed, fqn, device))

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """(Re)initialise the parameters in place with `initial_value` (skipped on the meta device:
        nothing to fill). Without `seed`, one is drawn from torch's global generator, so
        `torch.manual_seed(s); Transformer(cfg)` is reproducible; the trainer passes run.seed."""
        real = [(fqn, p) for fqn, p in self.named_parameters() if not p.is_meta]
        if real and seed is None:
            seed = int(torch.randint(0, 2 ** 62, (), device="cpu").item())
        for fqn, p in real:
            p.copy_(self.initial_value(fqn, p.shape, p.device, p.dtype, seed=seed))

    def row_positions(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positions, document ids or None) that forward gives whole rows `tokens` [B, T]: a
        caller that cuts rows into pieces (context parallel) passes each piece its own part."""
        if self.cfg.doc_mask:
            return doc_ids(tokens, self.cfg.eot_id)
        return torch.arange(tokens.shape[1], device=tokens.device), None

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, doc: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T] -> logits [B, T, V]; on a pipeline stage, hidden states in or out.
        `positions` ([T] or [B, T], optional): the tokens' absolute positions, for a sequence that
        is not 0..T-1 (a context-parallel rank's chunks); the default is start_pos, start_pos + 1, ...
        Under model.doc_mask, `doc` [B, T] numbers each token's document and `positions` restart per
        document; both are computed here from the tokens (trainer.attention.doc_ids) unless given
        (a context-parallel rank holds chunks of a row: it passes those of the whole row). The model
        derives them itself so every engine (DDP, FSDP, TP) needs nothing; decoding with a cache
        treats what it is fed as one document (generate refuses a prompt holding end-of-text)."""
        seqlen = tokens.shape[1]
        if self.cfg.doc_mask and cache is None and doc is None:
            if tokens.dim() != 2 or positions is not None:   # a chunk's own numbering would be wrong
                raise ValueError("model.doc_mask: pass `doc` with `positions` (both from trainer.attention.doc_ids "
                                 "of whole rows) for a chunk of a row or a stage fed hidden states")
            positions, doc = doc_ids(tokens, self.cfg.eot_id)
        pos = positions if positions is not None else torch.arange(start_pos, start_pos + seqlen, device=tokens.device)
        if self.tok_embeddings is not None:
            h = self.tok_embeddings(tokens)
            if self.pos_embeddings is not None:
                h = h + self.pos_embeddings(pos)
            if self.sinusoidal is not None:
                h = h + self.sinusoidal[pos].to(h.dtype)
        else:
            h = tokens
        if self.rope is None:
            rope = None
        elif positions is None:
            rope = self.rope[start_pos:start_pos + seqlen]
        else:
            rope = self.rope[positions]
        for layer in self.layers.values():
            h = layer(h, rope, start_pos, cache, positions, doc)
        if self.norm is not None:
            h = self.norm(h)
        if self.output is not None:
            # muP's 1/m logit multiplier, applied to the head's input (D wide, not V): the same product
            if self.cfg.output_mult != 1.0:
                h = h * self.cfg.output_mult
            h = self.output(h)
        return h

    def num_params(self, include_embedding: bool = True) -> int:
        """Counted from the real tensors (tied weights once); equals ModelConfig.num_params."""
        seen, n = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not include_embedding and name.split(".")[0] in ("tok_embeddings", "pos_embeddings", "output"):
                continue
            n += p.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        return self.cfg.flops_per_token(seq_len)

    def aux_loss(self) -> torch.Tensor | None:
        """The MoE balancing and z losses of the last forward (None for a dense model): the
        engine adds them to the training loss."""
        return moe.aux_loss(self)

    def after_step(self, dp_sum) -> None:
        """Called by the engine after each optimizer step (MoE: expert loads, bias update)."""
        moe.after_step(self, dp_sum)
