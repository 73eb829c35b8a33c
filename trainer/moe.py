"""Mixture-of-Experts feed-forward: a router picks `moe_top_k` of `moe_experts` MLPs per token.

Expert weights are 3-D tensors [E, in, out] (w1/w3 [E, dim, h], w2 [E, h, dim]): one grouped GEMM
runs every expert over its slice of the tokens sorted by expert (`torch._grouped_mm`), and expert
parallel can later shard dim 0. Routing is dropless unless `moe_capacity_factor` > 0.

Balancing (both optional, both on by default only for the aux loss):
- auxiliary loss (Switch / GShard): E * sum_i f_i * P_i, f_i the share of assignments routed to
  expert i and P_i its mean router probability; 1 at perfect balance. Weighted by moe_aux_coef.
- aux-loss-free bias (DeepSeek-V3): a per-expert bias added to the scores for the top-k choice only
  (the gate weights stay the unbiased scores); after each optimizer step it moves by
  moe_bias_rate * sign(mean load - load), from the load of the whole step over all ranks.
- Sinkhorn choice (Clark et al. 2022's S-BASE; Megatron's "sinkhorn" routing): in training, each
  micro-batch's top-k is taken on logits + a per-expert log-scale that a few Sinkhorn iterations
  fit so that every expert gets an equal share of the micro-batch's probability mass, then a few
  price steps on the hard top-k counts even what Sinkhorn's soft shares leave uneven; the gates
  stay the unbiased scores and evaluation (and so an export) routes by the plain scores
  (moe_sinkhorn_iters, moe_sinkhorn_hard_steps; no state, so nothing to checkpoint).
- router z-loss (ST-MoE): mean(logsumexp(logits)^2), keeps router logits small (moe_z_coef).

Statistics stay on the device and are read only where a logging step asks (`moe_metrics`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.model_config import ModelConfig

# Row strides of the grouped GEMM's operands must be multiples of 16 bytes (torch's CPU and CUDA
# kernels refuse others): widths that break this take the per-expert loop.
GROUPED_MM_ALIGN_BYTES = 16


def grouped_mm_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    size = x.element_size()
    return all((n * size) % GROUPED_MM_ALIGN_BYTES == 0 for n in (w.shape[1], w.shape[2]))


def expert_matmul(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor, grouped: bool) -> torch.Tensor:
    """Rows x[offs[i-1]:offs[i]] times w[i] for every expert i (x sorted by expert, offs int32
    cumulative row counts ending at len(x)). Grouped: one kernel, nothing read on the host. The
    loop reads the counts on the host (a device sync per call): the fallback and the reference."""
    if grouped:
        return torch._grouped_mm(x, w, offs=offs)
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))])


class Experts(nn.Module):
    """E MLPs (swiglu or gelu) as stacked weights, run over tokens sorted by expert."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, d, h = cfg.moe_experts, cfg.dim, cfg.expert_hidden
        self.swiglu = cfg.activation == "swiglu"
        self.w1 = nn.Parameter(torch.empty(e, d, h))
        self.w2 = nn.Parameter(torch.empty(e, h, d))
        self.w3 = nn.Parameter(torch.empty(e, d, h)) if self.swiglu else None
        self.grouped: bool | None = None    # None: grouped GEMM where it fits; False forces the loop (tests, bench)

    def forward(self, x: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        w1 = self.w1.to(x.dtype)     # autocast does not cover _grouped_mm: cast like autocast would
        grouped = grouped_mm_fits(x, w1) if self.grouped is None else self.grouped
        h = expert_matmul(x, w1, offs, grouped)
        if self.swiglu:
            h = F.silu(h) * expert_matmul(x, self.w3.to(x.dtype), offs, grouped)
        else:
            h = F.gelu(h, approximate="tanh")
        return expert_matmul(h, self.w2.to(x.dtype), offs, grouped)


@torch.no_grad()
def sinkhorn_log_scale(logits: torch.Tensor, iters: int) -> torch.Tensor:
    """The per-expert log column scale of Sinkhorn's balancing of exp(logits) [N, E]: rows
    (tokens) scaled to sum 1, columns (experts) to sum N / E, alternately, `iters` times. A token's
    ranking of logits + this scale is its ranking in the balanced matrix (its row scale is common to
    all its experts). A fixed count, no convergence test: no host sync in the forward."""
    cost = (logits - logits.amax(-1, keepdim=True)).exp()          # (0, 1]; a row's shift is its row scale
    n, e = cost.shape
    col = torch.ones(e, dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        row = 1.0 / (cost @ col).clamp(min=1e-30)
        col = (n / e) / (row @ cost).clamp(min=1e-30)
    return col.log()


@torch.no_grad()
def even_hard_counts(logits: torch.Tensor, scale: torch.Tensor, k: int, steps: int) -> torch.Tensor:
    """Sinkhorn evens the soft shares; the hard top-k of the balanced matrix can still be uneven (up to
    1.5-1.6 max/mean where tokens rank the experts alike). Refine the log-scale with `steps` damped
    price steps on the hard counts (an auction's move: an over-subscribed expert gets dearer), each
    0.5 x the logits' mean per-expert std x log(count / mean), and keep the most even of the scales
    tried (never worse than Sinkhorn's). On device throughout: no host sync."""
    n, e = logits.shape
    mean = n * k / e
    rate = 0.5 * logits.std(0).mean()
    ones = torch.ones(n * k, device=logits.device)

    def counts_of(s: torch.Tensor) -> torch.Tensor:
        picks = torch.topk(logits + s, k, -1).indices.reshape(-1)
        return torch.zeros(e, device=logits.device).scatter_add_(0, picks, ones)

    counts = counts_of(scale)
    best, best_max = scale, counts.max()
    for _ in range(steps):
        scale = scale - rate * (counts.clamp(min=0.5) / mean).log()
        counts = counts_of(scale)
        better = counts.max() < best_max
        best, best_max = torch.where(better, scale, best), torch.minimum(counts.max(), best_max)
    return best


def in_backward() -> bool:
    """Whether autograd is running a backward pass now: activation checkpointing recomputes the
    forward there, and that second forward must not count its tokens twice."""
    return torch._C._current_graph_task_id() != -1


class MoE(nn.Module):
    """Router + routed experts (+ shared experts, always on, DeepSeek style)."""

    def __init__(self, cfg: ModelConfig, shared: nn.Module | None):
        super().__init__()
        self.n_experts, self.top_k = cfg.moe_experts, cfg.moe_top_k
        self.sigmoid = cfg.moe_router == "sigmoid"
        self.norm_topk = cfg.moe_norm_topk
        self.capacity_factor = cfg.moe_capacity_factor
        self.sinkhorn_iters, self.hard_steps = cfg.moe_sinkhorn_iters, cfg.moe_sinkhorn_hard_steps
        self.aux_coef, self.z_coef, self.bias_rate = cfg.moe_aux_coef, cfg.moe_z_coef, cfg.moe_bias_rate
        self.router = nn.Linear(cfg.dim, cfg.moe_experts, bias=False)
        self.experts = Experts(cfg)
        self.shared = shared
        # Persistent (checkpointed) routing state; the step's counters are not saved.
        self.register_buffer("expert_bias", torch.zeros(cfg.moe_experts))
        self.register_buffer("step_load", torch.zeros(cfg.moe_experts), persistent=False)
        self.register_buffer("step_stats", torch.zeros(4), persistent=False)   # aux, z, dropped, forwards
        self.aux: torch.Tensor | None = None     # the weighted aux + z loss of the last forward

    def reset_state(self, device=None) -> None:
        """Zero bias and counters (a fresh model; a checkpoint then restores the bias)."""
        device = device or self.router.weight.device
        if device.type == "meta":
            return
        self.expert_bias = torch.zeros(self.n_experts, device=device)
        self.step_load = torch.zeros(self.n_experts, device=device)
        self.step_stats = torch.zeros(4, device=device)

    def route(self, x: torch.Tensor):
        """x [N, d] -> (expert ids [N, k], gate weights [N, k], router logits fp32, scores fp32)."""
        logits = F.linear(x.float(), self.router.weight.float())
        scores = logits.sigmoid() if self.sigmoid else logits.softmax(-1)
        if self.sinkhorn_iters and self.training:
            scale = sinkhorn_log_scale(logits, self.sinkhorn_iters)
            if self.hard_steps:
                scale = even_hard_counts(logits, scale, self.top_k, self.hard_steps)
            pick = logits + scale
        else:
            pick = scores + self.expert_bias
        chosen = torch.topk(pick, self.top_k, dim=-1).indices
        gates = scores.gather(-1, chosen)
        if self.norm_topk:
            gates = gates / gates.sum(-1, keepdim=True).clamp(min=1e-20)
        return chosen, gates, logits, scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, tokens = x.shape, x
        x = x.reshape(-1, shape[-1])
        n, k, e = x.shape[0], self.top_k, self.n_experts
        chosen, gates, logits, scores = self.route(x)
        flat = chosen.reshape(-1)                                   # [N*k], token t's picks at t*k..t*k+k-1
        counts = torch.zeros(e, dtype=torch.int64, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
        order = torch.argsort(flat, stable=True)                    # by expert; earlier tokens first
        kept = counts
        keep = None
        if self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * n * k / e)
            sorted_e = flat[order]
            rank = torch.arange(n * k, device=x.device) - (torch.cumsum(counts, 0) - counts)[sorted_e]
            dropped = rank >= capacity
            # Dropped rows go to the end (computed by the last expert, then weighted 0): the grouped
            # GEMM needs every row in some group, and a zero weight sends them no gradient.
            order = order[torch.argsort(sorted_e + e * dropped.long(), stable=True)]
            kept = counts.clamp(max=capacity)
            keep = torch.arange(n * k, device=x.device) < kept.sum()
        offs = torch.cumsum(kept, 0)
        offs[-1] = n * k
        y = self.experts(x[order // k], offs.to(torch.int32))
        w = gates.reshape(-1)[order].to(y.dtype)[:, None]
        y = y * w if keep is None else torch.where(keep[:, None], y * w, torch.zeros_like(y))
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n * k, device=x.device)
        out = y[inverse].view(n, k, -1).sum(1).view(shape)
        if self.shared is not None:
            # on the [B, T, D] input, as a dense MLP: tensor parallel splits it like one
            out = out + self.shared(tokens)
        self.account(x, counts, kept, logits, scores)
        return out

    def account(self, x, counts, kept, logits, scores) -> None:
        """Aux losses of this forward (kept for the engine) and the step's counters."""
        n = x.shape[0]
        probs = scores / scores.sum(-1, keepdim=True) if self.sigmoid else scores
        frac = counts.float() / (n * self.top_k)
        aux = self.n_experts * (frac * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        self.aux = self.aux_coef * aux + self.z_coef * z if self.training else None
        if self.training and not in_backward():
            with torch.no_grad():
                self.step_load += kept.float()
                dropped = (counts - kept).sum().float()
                self.step_stats += torch.stack([aux.detach(), z.detach(), dropped, torch.ones_like(dropped)])


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of the weighted aux and z losses of the last forward, or None (dense, or eval)."""
    terms = [m.aux for m in moe_layers(model) if m.aux is not None]
    return torch.stack(terms).sum() if terms else None


@torch.no_grad()
def after_step(model: nn.Module, dp_sum) -> None:
    """After an optimizer step: sum the step's loads and counters over data-parallel ranks (one
    collective, nothing read on the host), move the expert biases, keep the step's totals for
    `moe_metrics` and zero the counters."""
    layers = moe_layers(model)
    if not layers:
        return
    total = dp_sum(torch.stack([torch.cat([m.step_load, m.step_stats]) for m in layers]))
    for m, row in zip(layers, total):
        load = row[:m.n_experts]
        if m.bias_rate > 0:
            m.expert_bias += m.bias_rate * torch.sign(load.mean() - load)
        m.last_step = row
        m.step_load.zero_()
        m.step_stats.zero_()


def moe_metrics(model: nn.Module) -> dict:
    """The last step's routing numbers (a host read: logging steps only): per MoE layer the max/mean
    expert load; over layers the worst max/mean, the mean aux and z losses and the share of
    assignments dropped by the capacity limit."""
    layers = [m for m in moe_layers(model) if hasattr(m, "last_step")]
    if not layers:
        return {}
    rows = torch.stack([m.last_step.float() for m in layers]).cpu()
    e = layers[0].n_experts
    load, (aux, z, dropped, forwards) = rows[:, :e], rows[:, e:].T
    ratio = (load.max(1).values / load.mean(1).clamp(min=1e-9)).tolist()
    out = {"moe_aux_loss": float((aux / forwards).mean()), "moe_z_loss": float((z / forwards).mean()),
           "moe_load_max_mean": max(ratio),
           "moe_dropped": float(dropped.sum() / (dropped.sum() + load.sum()).clamp(min=1))}
    out.update({f"moe_load_max_mean_l{i}": r for i, r in enumerate(ratio)})
    return out
