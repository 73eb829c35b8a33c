"""Time of one optimizer step under a layout: compute, TP collectives, pipeline bubble and sends,
data-parallel reduction with the overlap each mode allows, and the optimizer step.

Every term is (work) / (peak x efficiency) with the cluster profile's constants; nothing is fitted
per model. Collectives are ring algorithms: an all-reduce moves 2(n-1)/n of the buffer per rank,
an all-gather or reduce-scatter (n-1)/n.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from core.model_config import ModelConfig

from .cluster import ClusterProfile
from .layout import Layout, Stack
from .memory import act_bytes, model_state, unsharded_params
from .shapes import flop_split, local_shape, stage_layer_count, stage_param_groups

INF = float("inf")


@dataclass(frozen=True)
class Link:
    bytes_per_s: float
    latency_s: float


def group_link(cluster: ClusterProfile, size: int, stride: int) -> Link:
    """The bottleneck link of a process group of `size` ranks spaced `stride` apart in the rank
    order (tp innermost, then dp_shard, dp_replicate, pp). A group spread over nodes with k of its
    ranks on each node runs NCCL's rings through k network rails at once."""
    nv = Link(cluster.nvlink_gbs * 1e9 * cluster.efficiency.nvlink, cluster.nvlink_latency_us * 1e-6)
    if size <= 1:
        return Link(INF, 0.0)
    per_node = max(1, cluster.gpus_per_node // stride) if stride < cluster.gpus_per_node else 1
    local = min(size, per_node)
    if local >= size and size * stride <= cluster.gpus_per_node:
        return nv
    ib = local * cluster.ib_gbs_per_gpu * 1e9 * cluster.efficiency.ib
    return Link(min(nv.bytes_per_s, ib), cluster.ib_latency_us * 1e-6)


def all_reduce(nbytes: float, n: int, link: Link) -> float:
    return 0.0 if n <= 1 else 2 * (n - 1) / n * nbytes / link.bytes_per_s + 2 * (n - 1) * link.latency_s


def all_gather(nbytes: float, n: int, link: Link) -> float:
    """Also the time of a reduce-scatter of the same (unsharded) size."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / link.bytes_per_s + (n - 1) * link.latency_s


def all_to_all(nbytes: float, n: int, link: Link) -> float:
    """Each of n ranks keeps 1/n of its `nbytes` and sends the rest, n - 1 pieces (pairwise)."""
    return 0.0 if n <= 1 else (n - 1) / n * nbytes / link.bytes_per_s + (n - 1) * link.latency_s


def ep_dispatch_seconds(cfg: ModelConfig, layout: Layout, cluster: ClusterProfile) -> float:
    """One MoE block's forward all-to-alls under expert parallel, one microbatch: the dispatch of
    each token's top-k copies (k x dim activations) to the ranks holding their experts and the
    combine bringing them back, 2 x all_to_all(tokens x k x dim). The ep group is ep consecutive
    dp_shard ranks (stride tp). Assumes balanced routing (the all-to-all waits for the busiest)."""
    if layout.ep <= 1 or not cfg.moe_experts:
        return 0.0
    nbytes = layout.micro_batch * layout.seq_len * cfg.moe_top_k * cfg.dim * act_bytes(layout.dtype)
    return 2 * all_to_all(nbytes, layout.ep, group_link(cluster, layout.ep, layout.tp))


def elementwise_bytes_per_token(cfg: ModelConfig, layout: Layout, stack: Stack) -> tuple[float, float]:
    """HBM traffic of one layer's memory-bound kernels in the forward pass, per token:
    (whole layer, attention core only). The backward is taken as twice the forward."""
    t, e, d, H = layout.tp, act_bytes(layout.dtype), cfg.dim, cfg.hidden
    hd, a, k = cfg.head_dim, cfg.n_heads, cfg.kv_heads
    rep = 1 / t if layout.sp else 1.0
    mask = 1 if stack.dropout else 0
    x = 2 * 2 * d * e * rep                                    # two norms: read, write
    if stack.fused_elementwise:                                # bias-dropout-add: read 2, write 1 (+mask)
        x += 2 * (3 * d * e + mask * d) * rep
        x += (2 if cfg.activation == "gelu" else 3) * H * e / t    # fused bias+activation
    else:
        x += 2 * 3 * d * e * rep                               # residual adds
        x += (2 if cfg.activation == "gelu" else 5) * H * e / t
        if stack.dropout:
            x += 2 * (2 * d * e + d) * rep
        if cfg.bias:
            x += 2 * ((a + 2 * k) * hd + d + H + d) * e / t     # bias adds: read + write
    if cfg.position == "rope":
        x += 2 * (a + k) * hd * e / t                          # rotate q and k
    x += 2 * a * hd * e / t                                    # transpose-copy of the attention output
    core = 0.0
    if not stack.flash_attention:                              # scores written and read back
        s = layout.seq_len
        core = a * s / t * (2 * e if stack.fused_elementwise else 6 * e)  # scale-mask-softmax
        if stack.dropout:
            core += a * s / t * (2 * e + 1)
    return x + core, core


def _gemm_memory_excess(cfg: ModelConfig, layout: Layout, tokens: int, mm: float, hbm: float) -> float:
    """Forward seconds the layer's GEMMs spend beyond their FLOP time because they are memory-bound
    (roofline: a GEMM takes max(FLOPs / matmul rate, bytes / HBM rate)). As the tokens per rank shrink
    the weight matrix, read once per pass, stops being amortised: few rows per GEMM means low
    arithmetic intensity. 0 for the large per-rank batches of Table 1."""
    e, excess = act_bytes(layout.dtype), 0.0
    for count, specs in stage_param_groups(cfg, 1, 1, 0)[:1]:     # one layer's tensors
        for spec in specs:
            if len(spec.shape) != 2:
                continue
            out_f, in_f = local_shape(spec, layout.tp)
            flops = 2 * tokens * out_f * in_f
            nbytes = (out_f * in_f + tokens * (out_f + in_f)) * e
            excess += max(0.0, nbytes / hbm - flops / mm)
    return excess


def _dp_collectives(cfg: ModelConfig, layout: Layout, stack: Stack, stage: int, tp_params: int) -> tuple[int, int]:
    """(all-gathers, reduce-scatters) of one pass over a stage's sharded parameters: one per FSDP
    unit (each layer, the embedding, the head), one per parameter tensor under stack.dp_gather =
    "tensor", and gradients in buckets of stack.dp_reduce_bucket elements when set."""
    if stack.dp_gather == "tensor":
        gathers = sum(c * len(specs) for c, specs in stage_param_groups(cfg, layout.pp, layout.pp_virtual_stages, stage))
    else:
        gathers = stage_layer_count(cfg.n_layers, layout.pp, layout.pp_virtual_stages, stage) + 2
    reduces = -(-tp_params // stack.dp_reduce_bucket) if stack.dp_reduce_bucket else gathers
    return gathers, reduces


def _shared_core_bubble(cluster: ClusterProfile, layout: Layout) -> float:
    """The part of the pipeline bubble that costs time when ranks share fewer cores than they are
    (1 for devices of their own). In ramp step j of the fill (and drain) j stages of g ranks run: on
    devices the machine is j / p used; on c shared cores it is min(1, j g / c) used, the waiting ranks
    lending their cores to the running ones. The bubble's cost scales with the idle machine share."""
    c, p, world = cluster.cores_per_node, layout.pp, cluster.gpus_per_node
    if not 0 < c < world or p == 1:
        return 1.0
    g = layout.gpus // p
    shared = sum(1 - min(1.0, j * g / c) for j in range(1, p)) / (p - 1)
    own = sum(1 - j / p for j in range(1, p)) / (p - 1)
    return shared / own


def fsdp_wraps(layout: Layout) -> bool:
    """Whether meshformer's trainer puts FSDP2 on the model (parallel/dims.py fsdp_enabled): for
    sharding, and for replication too under TP or PP, where torch's DDP does not compose."""
    return layout.shard > 1 or layout.cp > 1 or (layout.dp_replicate > 1 and (layout.tp > 1 or layout.pp > 1))


@dataclass(frozen=True)
class TimeBreakdown:
    compute: float            # forward + backward (+ recompute) of all microbatches on the slowest stage
    recompute: float          # part of compute spent recomputing activations
    tp_comm: float            # TP / SP collectives (not overlapped), included in compute
    bubble: float             # pipeline fill and drain
    p2p: float                # stage-to-stage sends
    dp_comm: float            # data-parallel collectives (total)
    dp_exposed: float         # the part not hidden behind compute
    optimizer: float
    step: float
    ep_comm: float = 0.0      # expert-parallel all-to-alls (not overlapped), included in compute

    def to_dict(self) -> dict:
        return asdict(self)


def _stage_microbatch_time(cfg: ModelConfig, layout: Layout, stack: Stack, cluster: ClusterProfile,
                           n_layers: int, first: bool, last: bool) -> tuple[float, float, float, float, float]:
    """(forward+backward+recompute, recompute, TP comm, backward, EP comm) seconds of one
    microbatch through `n_layers` layers of a stage, with the embedding or the head when it has
    them. MoE blocks add their all-to-alls: forward, backward (the same volume back) and the
    recompute of full AC, for the stage's share of MoE blocks."""
    t, e = layout.tp, act_bytes(layout.dtype)
    tokens = layout.tokens_per_rank        # each attends to the whole sequence: flop_split(seq_len)
    fl = flop_split(cfg, layout.seq_len)
    mm, at, hbm = cluster.matmul_flops(layout.dtype), cluster.attention_flops(layout.dtype), cluster.hbm_bytes_per_s
    elem, core = elementwise_bytes_per_token(cfg, layout, stack)
    dense_f = tokens * fl.dense_per_layer / 3 / t / mm         # forward = one third of the 3 passes
    dense_f += _gemm_memory_excess(cfg, layout, tokens, mm, hbm)
    attn_f = tokens * fl.attention_per_layer / 3 / t / at
    elem_f = tokens * elem / hbm
    tp_link = group_link(cluster, t, 1)
    act = tokens * cfg.dim * e
    comm_f = 2 * all_reduce(act, t, tp_link)                   # attention and MLP outputs (SP: AG + RS, same volume)
    # context parallel: K/V pass cp-1 times round the ring forward, their gradients as often
    # backward (parallel/context.py does not overlap them with the blocks: counted in full)
    if layout.cp > 1:
        cp_link = group_link(cluster, layout.cp, t)
        kv = 2 * tokens * cfg.kv_heads * cfg.head_dim / t * e
        comm_f += (layout.cp - 1) * (kv / cp_link.bytes_per_s + cp_link.latency_s)
    host = (cluster.layer_overhead_us + (cluster.tp_layer_overhead_us if t > 1 else 0.0)) * 1e-6
    fwd = dense_f + attn_f + elem_f + comm_f + host
    bwd = 2 * (dense_f + attn_f + elem_f + host) + comm_f
    rec = {"none": 0.0, "full": fwd, "selective": attn_f + tokens * core / hbm}[layout.ac]
    per_layer = fwd + bwd + rec
    total, recompute, comm, bwd_total = n_layers * per_layer, n_layers * rec, n_layers * 2 * comm_f, n_layers * bwd
    if layout.ac == "full":
        comm += n_layers * comm_f
    fwd_a2a = n_layers * cfg.n_moe_layers / cfg.n_layers * ep_dispatch_seconds(cfg, layout, cluster)
    ep_comm = (3 if layout.ac == "full" else 2) * fwd_a2a
    total, bwd_total = total + ep_comm, bwd_total + fwd_a2a
    # FSDP's per-unit host work (each block and the stage's root), in the forward and the backward
    fsdp = (n_layers + 1) * cluster.fsdp_unit_overhead_us * 1e-6 if fsdp_wraps(layout) else 0.0
    total, bwd_total = total + 2 * fsdp, bwd_total + fsdp
    if first:
        c = all_reduce(act, t, tp_link)                        # vocab-parallel embedding output
        total, comm = total + c + 3 * host, comm + c           # the embedding dispatches like a layer
    if last:
        head = tokens * fl.head / t / mm                       # output projection, 3 passes
        loss = tokens * cfg.vocab_size / t * (4 * e + 16) / hbm  # softmax cross-entropy, fwd + bwd
        c = all_reduce(act, t, tp_link)                        # gradient of the head's input
        total += head + loss + c + 3 * host                    # head and loss dispatch like a layer
        comm += c
        bwd_total += 2 / 3 * head + c
    return total, recompute, comm, bwd_total, ep_comm


def step_time(cfg: ModelConfig, layout: Layout, stack: Stack, cluster: ClusterProfile) -> TimeBreakdown:
    p, v, m = layout.pp, layout.pp_virtual_stages, layout.microbatches
    per_stage = []
    for s in range(p) if p <= 3 else (0, 1, p - 1):            # middle stages equal stage 1
        n = stage_layer_count(cfg.n_layers, p, v, s)
        per_stage.append((_stage_microbatch_time(cfg, layout, stack, cluster, n, s == 0, s == p - 1), s))
    (t_mb, rec_mb, comm_mb, bwd_mb, ep_mb), _ = max(per_stage, key=lambda x: x[0][0])
    if p <= 3:
        t_mean = sum(x[0][0] for x in per_stage) / p
    else:
        t_mean = (per_stage[0][0][0] + (p - 2) * per_stage[1][0][0] + per_stage[2][0][0]) / p
    compute = m * t_mb
    bubble = (p - 1) / v * t_mean
    if layout.pp_schedule == "zero_bubble":
        bubble /= 3     # ZB-H1: weight gradients fill the drain; bubble (p-1)(F+B-W) with F=B=W
    bubble *= _shared_core_bubble(cluster, layout)
    p2p = 0.0
    if p > 1:
        link = group_link(cluster, p, layout.tp * layout.dp)
        nbytes = layout.micro_batch * layout.seq_len * cfg.dim * act_bytes(layout.dtype)
        if layout.sp or stack.fused_elementwise:               # sent split over TP ranks (Megatron's scatter-gather)
            nbytes /= layout.tp
        p2p = 2 * (m * v + p - 1) * (nbytes / link.bytes_per_s + link.latency_s)

    dp_comm, dp_exposed, opt = _data_parallel(cfg, layout, stack, cluster, t_mb, bwd_mb)
    step = compute + bubble + p2p + dp_exposed + opt + cluster.step_overhead_ms * 1e-3
    return TimeBreakdown(compute=compute, recompute=m * rec_mb, tp_comm=m * comm_mb, bubble=bubble, p2p=p2p,
                         dp_comm=dp_comm, dp_exposed=dp_exposed, optimizer=opt, step=step, ep_comm=m * ep_mb)


def _data_parallel(cfg, layout: Layout, stack: Stack, cluster: ClusterProfile, t_mb: float, bwd_mb: float):
    """(total DP communication, exposed part, optimizer step) for the fullest stage."""
    stage = 0
    tp_params, unit = unsharded_params(cfg, layout, stage)
    state = model_state(cfg, layout, stack, stage)
    ns, nr, m = layout.shard, layout.dp_replicate, layout.microbatches
    shard_link = group_link(cluster, ns, layout.tp)
    rep_link = group_link(cluster, nr, layout.tp * ns)
    gather_bytes = 4 if layout.dtype == "fp32" else (1 if layout.dtype == "fp8" else 2)
    grad = stack.grad_bytes
    total = exposed = 0.0
    overlap = stack.dp_overlap and cluster.comm_overlap
    if ns > 1:
        # every collective pays the ring's (n - 1) steps of latency: with thousands of ranks and one
        # gather per tensor this, not bandwidth, is what stops data parallelism scaling
        gathers, reduces = _dp_collectives(cfg, layout, stack, stage, tp_params)
        ag = all_gather(tp_params * gather_bytes, ns, shard_link) + (gathers - 1) * (ns - 1) * shard_link.latency_s
        rs = all_gather(tp_params * grad, ns, shard_link) + (reduces - 1) * (ns - 1) * shard_link.latency_s
        if layout.pp > 1:
            # torch's pipelining keeps the stage gathered after each backward (reshard_after_backward
            # False) and reduces once per step, but FSDP's reshard_after_forward (our default) frees it
            # after every forward: one gather per microbatch for its backward, one for the first forward
            total += (m + 1) * ag + rs
            exposed += (m * max(0.0, ag - t_mb) + max(0.0, ag + rs - t_mb)) if overlap else (m + 1) * ag + rs
        else:                 # per microbatch: gather for forward, again for backward, reduce-scatter
            per_mb = 2 * ag + rs
            total += m * per_mb
            first = all_gather(unit * gather_bytes, ns, shard_link)  # the first unit cannot be prefetched
            exposed += m * (max(0.0, per_mb - t_mb) + first) if overlap else m * per_mb
    if nr > 1:
        ar = all_reduce(tp_params / ns * grad, nr, rep_link)
        total += ar
        exposed += max(0.0, ar - bwd_mb) if overlap else ar
    # Adam: read param, grad, m, v; write param, m, v (fp32) and a low-precision weight copy if kept
    opt_bytes = state.params * (7 * 4 + stack.model_weights_bytes) + state.params * grad  # + grad-norm pass
    opt = opt_bytes / cluster.hbm_bytes_per_s
    return total, exposed, opt
