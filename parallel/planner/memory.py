"""Memory per GPU of one training step under a layout: model state, activations, transients.

Model state is exact per rank (parameters, gradients, Adam states, padded as FSDP2 pads); the
rest is an estimate from the shapes of the tensors autograd saves (Korthikanti et al. 2022, Sec. 4,
redone for torch's SDPA, SwiGLU and GQA). The worst pipeline rank decides whether a layout fits.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from core.model_config import ModelConfig

from .cluster import GIB, ClusterProfile
from .layout import Layout, Stack
from .shapes import local_numel, stage_layer_count, stage_param_groups

ADAM_STEP_BYTES = 4      # torch's Adam keeps `step` as a 0-d fp32 tensor per parameter


def act_bytes(dtype: str) -> int:
    return 4 if dtype == "fp32" else 2


@dataclass(frozen=True)
class ModelState:
    params: int              # parameter elements stored on this rank
    tensors: int             # parameter tensors on this rank
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def model_state(cfg: ModelConfig, layout: Layout, stack: Stack, stage: int) -> ModelState:
    """Bytes of parameters, gradients and optimizer states held by one rank of pipeline stage
    `stage`, sharded by TP (DTensor) and FSDP2 (dim-0, padded)."""
    groups = stage_param_groups(cfg, layout.pp, layout.pp_virtual_stages, stage)
    n = sum(c * local_numel(s, layout.tp, layout.shard, layout.ep) for c, specs in groups for s in specs)
    tensors = sum(c * len(specs) for c, specs in groups)
    weight = 4 if layout.dtype == "fp32" else stack.master_weights_bytes
    return ModelState(params=n, tensors=tensors,
                      param_bytes=n * (weight + stack.model_weights_bytes),
                      grad_bytes=n * stack.grad_bytes,
                      optimizer_bytes=n * stack.optimizer_bytes + ADAM_STEP_BYTES * tensors)


def unsharded_params(cfg: ModelConfig, layout: Layout, stage: int) -> tuple[int, int]:
    """(elements on the stage after TP (and expert parallel) only, elements of its largest single
    FSDP unit): what FSDP gathers."""
    units = [(c, sum(local_numel(s, layout.tp, 1, layout.ep) for s in specs))
             for c, specs in stage_param_groups(cfg, layout.pp, layout.pp_virtual_stages, stage)]
    return sum(c * n for c, n in units), max(n for c, n in units if c)


def layer_activation_bytes_per_token(cfg: ModelConfig, layout: Layout, stack: Stack) -> float:
    """Bytes autograd keeps per token for one layer with no recomputation. Tensors in the
    residual stream are split over TP ranks only under sequence parallel; matmul inputs are
    all-gathered (torch keeps the gathered copy); head-split tensors are split over TP ranks.
    Norms are taken as fused kernels keeping their input and fp32 statistics (LayerNorm
    everywhere, RMSNorm on CUDA; torch's CPU RMSNorm is composite and keeps fp32 copies)."""
    t, e, d, H = layout.tp, act_bytes(layout.dtype), cfg.dim, cfg.hidden
    hd, a, k = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    rep = 1 / t if layout.sp else 1.0
    stats = 4 if cfg.norm == "rmsnorm" else 8                 # fp32 rstd (and mean) per token
    b = 2 * (d * e + stats) * rep                             # inputs of the two norms
    b += 2 * d * e                                            # inputs of the qkv and w1(/w3) matmuls
    b += (a + 2 * k) * hd * e / t                             # q, k, v kept for attention
    b += _attention_core_bytes(cfg, layout, stack)            # kept by the attention kernel
    b += a * hd * e / t                                       # attention output = input of wo
    b += (4 if cfg.activation == "swiglu" else 2) * H * e / t  # activation in/out (swiglu: w1, silu, w3, product)
    b += moe_extra_bytes_per_token(cfg, e, t)
    if stack.dropout:
        b += 2 * d * rep                                      # two residual dropout masks (1 byte)
    return b


def moe_extra_bytes_per_token(cfg: ModelConfig, e: int, tp: int = 1) -> float:
    """What a MoE block keeps beyond a dense block's MLP, per token, as the mean over blocks
    (trainer/moe.py's forward; tests/planner/test_activations.py checks it against autograd):
    - the top-k experts' and the shared experts' activations, as a dense MLP of width moe_hidden
      keeps them (top_k + shared widths in place of the dense width, which is taken back out);
    - the token copies sorted by expert (the experts' input) and their outputs before the gate
      weighting: k x dim each;
    - the router: an fp32 copy of its input (below fp32; the input itself then stays only if shared
      experts use it), the fp32 scores twice (the choice and
      the aux loss), the int64 expert ids, sort order and its inverse (4 x k x 8 bytes), and small
      per-token fp32/bf16 terms (gates, their sum, the z-loss logsumexp: 12 + 4k + e x k bytes)."""
    if not cfg.moe_experts:
        return 0.0
    acts, k, d = (4 if cfg.activation == "swiglu" else 2), cfg.moe_top_k, cfg.dim
    moe = acts * (k + cfg.moe_shared_experts) * cfg.expert_hidden * e + 2 * k * d * e
    moe += (4 * d if e != 4 else 0) + 2 * 4 * cfg.moe_experts + 4 * k * 8 + 12 + 4 * k + e * k
    if not cfg.moe_shared_experts and e != 4:    # the block's input itself is kept only by shared experts
        moe -= d * e                             # (or as the fp32 router's input): the dense count has it
    share = cfg.n_moe_layers / cfg.n_layers
    return share * (moe - acts * cfg.hidden * e / tp)


def _attention_core_bytes(cfg: ModelConfig, layout: Layout, stack: Stack) -> float:
    a, t, s, e = cfg.n_heads, layout.tp, layout.seq_len, act_bytes(layout.dtype)
    if stack.flash_attention:
        # fp32 log-sum-exp; the output it keeps is the same storage as wo's input (counted there)
        return a * 4 / t
    per_score = e + ((1 + e) if stack.dropout else 0)         # softmax out (+ dropout mask and output)
    return a * s * per_score / t


def layer_saved_bytes_per_token(cfg: ModelConfig, layout: Layout, stack: Stack) -> float:
    """What one layer keeps per token until its backward, under the activation checkpointing mode."""
    if layout.ac == "full":
        return cfg.dim * act_bytes(layout.dtype) * (1 / layout.tp if layout.sp else 1)
    full = layer_activation_bytes_per_token(cfg, layout, stack)
    if layout.ac == "selective":      # the attention core is recomputed (Korthikanti et al.)
        return full - _attention_core_bytes(cfg, layout, stack)
    return full


def chunks_in_flight(layout: Layout, stage: int) -> int:
    """Model chunks' worth of microbatch activations pipeline rank `stage` holds at its peak."""
    p, v, m = layout.pp, layout.pp_virtual_stages, layout.microbatches
    if p == 1:
        return 1
    if layout.pp_schedule == "gpipe":
        return m
    if layout.pp_schedule == "interleaved_1f1b":
        # torch Interleaved1F1B warm-up: (v-1)*p + 2*(p-1-rank) forwards, then one more forward
        return min(m * v, (v - 1) * p + 2 * (p - 1 - stage) + 1)
    return min(m, p - stage)   # 1f1b and zero_bubble (ZB-H1 keeps 1F1B's peak)


@dataclass(frozen=True)
class MemoryBreakdown:
    stage: int                # the pipeline rank with the largest need
    params: int
    grads: int
    optimizer: int
    activations: int
    transient: int            # unsharded FSDP params/grads, DDP buckets, autocast weight cache
    logits: int               # logits, their fp32 copy and gradient (last stage)
    margin: int               # allocator fragmentation + reserved context
    total: int
    capacity: int

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    TERMS = ("params", "grads", "optimizer", "activations", "logits", "transient", "margin")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fits"] = self.fits
        return d

    def describe(self) -> str:
        """Every term, in GiB, and the total they add up to (rounding aside) against the capacity:
        'params 1.9 + grads 1.9 + ... + margin 9.5 = 79.7 of 80 GiB'."""
        terms = " + ".join(f"{t} {getattr(self, t) / GIB:.1f}" for t in self.TERMS)
        return f"{terms} = {self.total / GIB:.1f} of {self.capacity / GIB:.1f} GiB"


def stage_memory(cfg: ModelConfig, layout: Layout, stack: Stack, cluster: ClusterProfile, stage: int) -> MemoryBreakdown:
    state = model_state(cfg, layout, stack, stage)
    e, tokens = act_bytes(layout.dtype), layout.tokens_per_rank      # context parallel: 1/cp of them
    n_layers = stage_layer_count(cfg.n_layers, layout.pp, layout.pp_virtual_stages, stage)
    per_chunk = layout.layers_per_chunk(cfg)
    saved = layer_saved_bytes_per_token(cfg, layout, stack) * tokens
    acts = chunks_in_flight(layout, stage) * min(per_chunk, n_layers) * saved
    if layout.ac == "full":           # the layer being recomputed holds its full activations
        acts += layer_activation_bytes_per_token(cfg, layout, stack) * tokens
    elif layout.ac == "selective":    # ... or its recomputed attention core
        acts += _attention_core_bytes(cfg, layout, stack) * tokens
    acts += 2 * cfg.dim * e * tokens  # embedding output / incoming activation and its gradient

    tp_params, unit = unsharded_params(cfg, layout, stage)
    ebytes = 4 if layout.dtype == "fp32" else 2
    transient = 0
    if layout.shard > 1:
        if layout.pp > 1:     # torch pipelining keeps FSDP unsharded across microbatches (no resync)
            transient += tp_params * (ebytes + 4)
        else:                 # current + prefetched unit gathered, one unit of unsharded gradients
            transient += unit * (2 * ebytes + ebytes + 4)
    elif layout.dp_replicate > 1:
        transient += state.params * stack.grad_bytes           # DDP's gradient buckets
    if layout.shard == 1 and layout.dtype != "fp32" and stack.model_weights_bytes == 0:
        transient += tp_params * 2                             # autocast's bf16 weight cache
    logits = 0
    if stage == layout.pp - 1:
        logits = int(tokens * cfg.vocab_size / layout.tp * (2 * e + 8))
    used = state.total + int(acts) + transient + logits
    margin = int(cluster.fragmentation * used + cluster.activation_slack * (acts + transient + logits)
                 + cluster.reserved_gib * 1024 ** 3)
    return MemoryBreakdown(stage=stage, params=state.param_bytes, grads=state.grad_bytes,
                           optimizer=state.optimizer_bytes, activations=int(acts), transient=transient,
                           logits=logits, margin=margin, total=used + margin, capacity=cluster.memory_bytes)


def memory_per_gpu(cfg: ModelConfig, layout: Layout, stack: Stack, cluster: ClusterProfile) -> MemoryBreakdown:
    """The largest per-GPU need over pipeline ranks (only the first, second and last can be the
    largest: the first holds most in-flight activations, the last the head and logits)."""
    stages = sorted({0, min(1, layout.pp - 1), layout.pp - 1})
    return max((stage_memory(cfg, layout, stack, cluster, s) for s in stages), key=lambda m: m.total)
