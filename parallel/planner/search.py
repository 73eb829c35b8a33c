"""Enumerate the layouts of a model on N GPUs, drop those that cannot run or do not fit, rank the
rest by predicted tokens per second.

Pruned on purpose (each is never better in the cost model, so the ranking loses nothing):
- sequence parallel is always on when tp > 1: same collective volume, less activation memory;
- GPipe is not tried: 1F1B has the same bubble with at most pp microbatches in flight;
- interleaving only with pp_virtual_stages dividing the layers per stage evenly.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from core.model_config import ModelConfig

from .cluster import ClusterProfile
from .layout import AC_MODES, Layout, Stack
from .memory import memory_per_gpu
from .predict import Prediction, predict


class NoLayoutFits(ValueError):
    """No torch layout fits: `meshformer plan` then tries DeepSpeed offload (offload.py)."""

    def __init__(self, message: str, reasons: str):
        super().__init__(message)
        self.reasons = reasons                    # "N does not fit in memory, ..."


# Context-parallel degrees tried when no layout without it fits (a sequence too long for one rank):
# at ordinary lengths the cost model's CP gains (activations / cp) are real but small, and a
# layout with fewer moving parts is the better advice.
CP_SIZES = (2, 4, 8)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class SearchResult:
    ranked: list[Prediction]                      # fitting layouts, roomy ones first, each group fastest first
    rejected: Counter = field(default_factory=Counter)   # reason -> count
    tried: int = 0
    headroom: float = 1.0                         # a layout above this fraction of GPU memory is "tight"

    def tight(self, pred: Prediction) -> bool:
        return is_tight(pred, self.headroom)


def is_tight(pred: Prediction, headroom: float) -> bool:
    """Predicted to fit, but above `headroom` x GPU memory: the estimate's error (activations and
    transients are estimates; the allocator margin is one fixed fraction) could make it not fit."""
    return pred.memory.total > headroom * pred.memory.capacity


def _dp_splits(dp: int, tp: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """(dp_replicate, dp_shard): DDP, FSDP over all DP ranks, and HSDP sharding within a node."""
    splits = {(dp, 1), (1, dp)}
    node_shard = max(1, gpus_per_node // tp)
    if 1 < node_shard < dp and dp % node_shard == 0:
        splits.add((dp // node_shard, node_shard))
    return sorted(splits)


def _ep_sizes(cfg: ModelConfig, dp_shard: int) -> list[int]:
    """Expert-parallel sizes to try: divisors of dp_shard that divide the experts (MoE only)."""
    return [e for e in divisors(dp_shard) if cfg.moe_experts % e == 0] if cfg.moe_experts else [1]


def candidate_layouts(cfg: ModelConfig, gpus: int, global_batch: int, seq_len: int, dtype: str,
                      cluster: ClusterProfile, max_micro_batch: int = 64, cp_sizes=(1,)) -> list[Layout]:
    out = []
    for tp in (t for t in divisors(gpus) if t <= cluster.gpus_per_node):
        if cfg.n_heads % tp or cfg.kv_heads % tp or cfg.hidden % tp or (tp > 1 and seq_len % tp):
            continue
        # context parallel (no pipeline with it): what lets a sequence too long for one rank fit
        for cp in (c for c in cp_sizes if (gpus // tp) % c == 0 and (c == 1 or seq_len % (2 * c * tp) == 0)):
            for pp in (p for p in divisors(gpus // (tp * cp)) if p <= cfg.n_layers and (cp == 1 or p == 1)):
                out += _layouts(cfg, tp, cp, pp, gpus // (tp * pp * cp), global_batch, seq_len, dtype, cluster,
                                max_micro_batch)
    return out


def _layouts(cfg: ModelConfig, tp: int, cp: int, pp: int, dp: int, global_batch: int, seq_len: int, dtype: str,
             cluster: ClusterProfile, max_micro_batch: int) -> list[Layout]:
    out = []
    if global_batch % dp:
        return out
    per_rank = global_batch // dp
    vs = [1] + ([v for v in range(2, cfg.n_layers // pp + 1) if (cfg.n_layers // pp) % v == 0
                 and cfg.n_layers % pp == 0] if pp > 1 else [])
    for rep, shard in _dp_splits(dp, tp * cp, cluster.gpus_per_node):
        for mb in (b for b in divisors(per_rank) if b <= max_micro_batch):
            m = per_rank // mb
            if pp > 1 and m < pp:
                continue
            for v in vs:
                if v > 1 and m % pp:
                    continue
                scheds = ["interleaved_1f1b"] if v > 1 else (["1f1b", "zero_bubble"] if pp > 1 else ["1f1b"])
                for sched in scheds:
                    # selective AC is refused with ep by the trainer (core/layout.py)
                    for ac, ep in ((a, e) for a in AC_MODES for e in _ep_sizes(cfg, shard)
                                   if not (a == "selective" and e > 1)):
                        out.append(Layout(tp=tp, pp=pp, pp_virtual_stages=v, dp_replicate=rep, dp_shard=shard,
                                          micro_batch=mb, microbatches=m, pp_schedule=sched, sp=tp > 1, ac=ac,
                                          dtype=dtype, seq_len=seq_len, cp=cp, ep=ep))
    return out


def search(cfg: ModelConfig, cluster: ClusterProfile, gpus: int, global_batch: int, seq_len: int,
           dtype: str = "bf16", stack: Stack | None = None, extra: list[Layout] = (),
           headroom: float = 1.0) -> SearchResult:
    """All layouts (and `extra` ones, e.g. the config's own), fitting ones ranked by tokens/s;
    with headroom < 1 those predicted above that fraction of GPU memory rank after all the others
    (`meshformer plan` uses 0.9; 1.0, the default here, ranks by speed alone)."""
    if gpus < 1 or global_batch < 1:
        raise ValueError(f"--gpus ({gpus}) and --global-batch ({global_batch}) must be positive")
    stack = stack or Stack()
    cluster.peak_flops(dtype)                 # a dtype this GPU lacks is the user's error, not the layouts'
    result = SearchResult(ranked=[], headroom=headroom)
    seen = set()
    _rank(cfg, cluster, stack, result, seen, [*extra, *candidate_layouts(cfg, gpus, global_batch, seq_len, dtype, cluster)])
    if not result.ranked:
        _rank(cfg, cluster, stack, result, seen,
              candidate_layouts(cfg, gpus, global_batch, seq_len, dtype, cluster, cp_sizes=CP_SIZES))
    result.ranked.sort(key=lambda p: (result.tight(p), -p.tokens_per_s))
    if not result.ranked:
        reasons = ", ".join(f"{n} {r}" for r, n in result.rejected.most_common())
        raise NoLayoutFits(f"no layout of this model fits {gpus} x {cluster.name} with global batch {global_batch} "
                         f"({reasons}); add GPUs, lower train.seq_len or the batch, or pick a larger-memory cluster", reasons)
    return result


def _rank(cfg: ModelConfig, cluster: ClusterProfile, stack: Stack, result: SearchResult, seen: set,
          layouts: list[Layout]) -> None:
    for layout in layouts:
        if layout in seen:
            continue
        seen.add(layout)
        result.tried += 1
        try:
            layout.validate(cfg)
        except ValueError as e:
            result.rejected[f"invalid ({str(e).split(':')[0]})"] += 1
            continue
        if not memory_per_gpu(cfg, layout, stack, cluster).fits:   # cheaper than timing it
            result.rejected["does not fit in memory"] += 1
            continue
        result.ranked.append(predict(cfg, layout, cluster, stack))


def explain(pred: Prediction) -> str:
    """Why this layout is where it is: where its step time and memory go."""
    t, m = pred.time, pred.memory
    s = t.step
    ep = f", EP all-to-all {t.ep_comm / s:.0%}" if t.ep_comm else ""
    parts = [f"compute {t.compute / s:.0%} (recompute {t.recompute / s:.0%}, TP/CP comm {t.tp_comm / s:.0%}{ep})"]
    if t.bubble:
        parts.append(f"bubble {t.bubble / s:.0%}")
    if t.p2p:
        parts.append(f"p2p {t.p2p / s:.0%}")
    if t.dp_comm:
        parts.append(f"DP comm {t.dp_comm / s:.0%} ({t.dp_exposed / s:.0%} exposed)")
    parts.append(f"optimizer {t.optimizer / s:.0%}")
    return "; ".join(parts) + f"\n    memory (GiB per GPU, pipeline stage {m.stage}): {m.describe()}"
