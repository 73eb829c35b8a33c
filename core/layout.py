"""Layout arithmetic: the sizes of the mesh dimensions for a world size, pipeline microbatches
and stage sizes, and the checks that a layout fits the model and batch.

One copy, used by the runtime (parallel/dims.py, parallel/pipeline.py), the planner
(`meshformer plan`) and `meshformer slurm` (checked before a job is queued), so a layout the
planner or the sbatch check accepts is the layout the trainer builds. Plain integers, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from core.parallel_config import ParallelConfig

# Outermost first: pipeline stages and data-parallel replicas span nodes, tensor parallel is the
# innermost (fastest-varying) dimension so a TP group is consecutive ranks, i.e. inside one node;
# context parallel next to it (its ring passes K/V every layer), data parallel shards outside.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# With expert parallel, dp_shard is built as (dp_shard / ep, ep): the experts are split over "ep"
# (consecutive dp_shard ranks) and FSDP-sharded over "edp_shard"; "dp_shard" is their flattening.
EP_MESH_DIMS = ("pp", "dp_replicate", "edp_shard", "ep", "tp")


@dataclass(frozen=True)
class LayoutSizes:
    pp: int
    dp_replicate: int
    dp_shard: int
    tp: int
    world_size: int
    cp: int = 1
    ep: int = 1

    @property
    def dp_size(self) -> int:
        return self.dp_replicate * self.dp_shard


def resolve_sizes(cfg: ParallelConfig, world_size: int) -> LayoutSizes:
    """The mesh sizes for `world_size` processes (dp_shard = -1 takes what the others leave)."""
    fixed = cfg.pp * cfg.dp_replicate * cfg.tp * cfg.cp
    shard = cfg.dp_shard
    if shard == -1:
        if world_size % fixed:
            raise ConfigError(f"parallel: pp*dp_replicate*cp*tp = {fixed} does not divide the world size {world_size} "
                              "(a world size not divisible by parallel.tp x cp x pp x dp_replicate leaves no whole dp_shard)")
        shard = world_size // fixed
    if fixed * shard != world_size:
        raise ConfigError(
            f"parallel: pp({cfg.pp}) x dp_replicate({cfg.dp_replicate}) x dp_shard({shard}) x cp({cfg.cp}) x tp({cfg.tp}) = "
            f"{fixed * shard}, but the world size is {world_size}")
    if shard % cfg.ep:
        raise ConfigError(f"parallel.ep: {cfg.ep} does not divide parallel.dp_shard = {shard} (expert parallel is "
                          "carved out of dp_shard); pick an ep that divides it")
    return LayoutSizes(pp=cfg.pp, dp_replicate=cfg.dp_replicate, dp_shard=shard, tp=cfg.tp, world_size=world_size,
                       ep=cfg.ep, cp=cfg.cp)


def microbatches(cfg: ParallelConfig) -> int:
    """Pipeline microbatches per step: pp_microbatches, else one per stage (pp x virtual stages),
    the fewest that keep every stage of an interleaved schedule busy."""
    return cfg.pp_microbatches or cfg.pp * cfg.pp_virtual_stages


def stage_layer_counts(cfg: ParallelConfig, n_layers: int) -> list[int]:
    """Layers in each pipeline stage (pp * virtual stages of them): pp_layers, or as even as
    possible with the extra layers on the earlier stages."""
    n_stages = cfg.pp * cfg.pp_virtual_stages
    if cfg.pp_layers:
        return list(cfg.pp_layers)
    base, extra = divmod(n_layers, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def validate_layout(cfg: ParallelConfig, model_cfg, batch_size: int, seq_len: int = 0) -> None:
    """Checks that need the model and batch as well as the layout; each error names the field."""
    tp = cfg.tp
    if cfg.ep > 1 and not model_cfg.moe_experts:
        raise ConfigError(f"parallel.ep: {cfg.ep} needs a MoE model (model.moe_experts > 0); set parallel.ep = 1")
    if cfg.ep > 1 and model_cfg.moe_experts % cfg.ep:
        raise ConfigError(f"parallel.ep: {cfg.ep} does not divide model.moe_experts = {model_cfg.moe_experts}; "
                          "pick an ep that divides it")
    if cfg.ep > 1 and cfg.engine == "deepspeed":
        raise ConfigError("parallel.ep: expert parallel is built on FSDP (parallel.engine = 'torch'), not on "
                          "'deepspeed'; set parallel.ep = 1 or parallel.engine = 'torch'")
    if cfg.ep > 1 and cfg.ac == "selective":
        # torch's selective checkpointing replays the recorded ops and fails on the different
        # profiler calls of the experts' own FSDP hooks in the recompute (torch 2.13)
        raise ConfigError("parallel.ac: 'selective' is not supported with parallel.ep > 1 yet; use 'full' or 'none'")
    if model_cfg.moe_experts:
        shared = model_cfg.moe_shared_experts * model_cfg.expert_hidden
        if tp > 1 and shared % tp:   # the shared experts are split like a dense MLP; routed experts are not
            raise ConfigError(f"parallel.tp: {tp} does not divide the MoE shared experts' width "
                              f"(model.moe_shared_experts x expert width = {shared}); pick a tp that divides it")
        if cfg.pp > 1 and cfg.pp_schedule == "zero_bubble":
            # torch's split backward (input gradients first, weights later) fails on the MoE blocks (tried)
            raise ConfigError("parallel.pp_schedule: 'zero_bubble' is not supported with model.moe_experts > 0 yet; "
                              "use gpipe, 1f1b or interleaved_1f1b")
        if cfg.engine == "deepspeed" and cfg.zero_stage == 3:
            # ZeRO-3 gathers a parameter in its module's forward; the router's weight is read by the
            # MoE module around it (trainer/moe.py: route), never gathered
            raise ConfigError("parallel.zero_stage: 3 is not supported with model.moe_experts > 0 under "
                              "parallel.engine = 'deepspeed' (untested: ZeRO-3 gathers a weight only in its own "
                              "module's forward); use zero_stage 0-2, or FSDP (parallel.engine = 'torch')")
    if tp > 1:
        for what, value in (("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.kv_heads),
                            ("the MLP width (model.ffn_hidden)", model_cfg.hidden),
                            ("model.vocab_size (vocab-parallel head)", model_cfg.vocab_size)):
            if value % tp:
                raise ConfigError(f"parallel.tp: {tp} does not divide {what} = {value}; pick a tp that divides it")
        if cfg.sp and (seq_len // cfg.cp) % tp:
            raise ConfigError(f"parallel.sp: sequence parallel splits train.seq_len = {seq_len} (/ cp = {cfg.cp}) over "
                              f"tp = {tp}; use a multiple of tp x cp or parallel.sp = false")
    if cfg.cp > 1:
        validate_cp(cfg, seq_len)
    n_stages = cfg.pp * cfg.pp_virtual_stages
    if cfg.pp > 1 or cfg.pp_virtual_stages > 1:
        if n_stages > model_cfg.n_layers:
            raise ConfigError(f"parallel.pp: {cfg.pp} x {cfg.pp_virtual_stages} virtual stages = {n_stages} stages "
                              f"but the model has only model.n_layers = {model_cfg.n_layers} layers")
        if cfg.pp_layers:
            if len(cfg.pp_layers) != n_stages or sum(cfg.pp_layers) != model_cfg.n_layers or min(cfg.pp_layers) < 1:
                raise ConfigError(f"parallel.pp_layers: {cfg.pp_layers} must list {n_stages} positive counts "
                                  f"(pp x pp_virtual_stages) summing to model.n_layers = {model_cfg.n_layers}")
        if model_cfg.tie_embeddings:
            raise ConfigError("model.tie_embeddings: a tied head cannot live on another pipeline stage than the "
                              "embedding; set it false or parallel.pp = 1")
        multi = cfg.pp_schedule in ("interleaved_1f1b", "zero_bubble")
        if cfg.pp_virtual_stages > 1 and not multi:
            raise ConfigError(f"parallel.pp_virtual_stages: {cfg.pp_virtual_stages} needs an interleaved schedule "
                              f"(interleaved_1f1b or zero_bubble), not {cfg.pp_schedule!r}")
        m = microbatches(cfg)
        if m < cfg.pp:
            raise ConfigError(f"parallel.pp_microbatches: {m} is fewer than the {cfg.pp} pipeline stages; "
                              f"use at least parallel.pp = {cfg.pp}")
        if multi and m % cfg.pp:
            raise ConfigError(f"parallel.pp_microbatches: {m} must be a multiple of parallel.pp = {cfg.pp} "
                              f"for the {cfg.pp_schedule} schedule")
        if batch_size % m:
            raise ConfigError(f"parallel.pp_microbatches: {m} does not divide train.batch_size = {batch_size}")


def validate_cp(cfg: ParallelConfig, seq_len: int) -> None:
    """Context parallel cuts each sequence into 2 x cp equal chunks (rank r: chunks r and 2cp-1-r)."""
    if seq_len % (2 * cfg.cp):
        raise ConfigError(f"parallel.cp: {cfg.cp} cuts train.seq_len = {seq_len} into 2 x cp = {2 * cfg.cp} equal "
                          f"chunks; use a seq_len divisible by {2 * cfg.cp}")
    if cfg.ep > 1:
        raise ConfigError("parallel.cp: context parallel with expert parallel is not built yet; set parallel.ep = 1 "
                          "or parallel.cp = 1")
    if cfg.pp > 1:
        raise ConfigError("parallel.cp: context parallel with pipeline parallel is not built yet (the schedule does "
                          "not pass the chunks' positions); set parallel.pp = 1 or parallel.cp = 1")
