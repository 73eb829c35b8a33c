"""One parallel layout of a training step, and the software assumptions the cost model makes.

The field names follow the run config (`[parallel]`, `[train]`, `[precision]`) so that a layout
prints as the `--section.key value` overrides that make the trainer run it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from core.model_config import ModelConfig

SCHEDULES = ("gpipe", "1f1b", "interleaved_1f1b", "zero_bubble")
AC_MODES = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp8")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    pp_virtual_stages: int = 1      # model chunks per pipeline rank (interleaved schedule)
    dp_replicate: int = 1           # DDP / HSDP replicas
    dp_shard: int = 1               # FSDP (ZeRO-3) shard group size
    micro_batch: int = 1            # sequences per microbatch
    microbatches: int = 1           # microbatches per DP rank per optimizer step (PP or grad accumulation)
    pp_schedule: str = "1f1b"
    sp: bool = False                # sequence parallel (needs tp > 1)
    ac: str = "none"
    dtype: str = "bf16"
    seq_len: int = 2048
    cp: int = 1                     # context parallel: each sequence over cp ranks (ring attention)
    ep: int = 1                     # expert parallel: MoE experts split over ep ranks carved out of dp_shard

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def shard(self) -> int:
        """FSDP's shard group: dp_shard x cp (context-parallel ranks hold the same weights)."""
        return self.dp_shard * self.cp

    @property
    def tokens_per_rank(self) -> int:
        """Tokens of one microbatch on one rank: its sequences' 1/cp."""
        return self.micro_batch * self.seq_len // self.cp

    @property
    def batch_per_dp_rank(self) -> int:
        return self.micro_batch * self.microbatches

    @property
    def global_batch(self) -> int:
        return self.dp * self.batch_per_dp_rank

    def validate(self, model: ModelConfig) -> None:
        """Raise ValueError naming the field when the layout cannot run this model."""
        for name in ("tp", "pp", "pp_virtual_stages", "dp_replicate", "dp_shard", "micro_batch", "microbatches", "seq_len",
                     "cp", "ep"):
            if getattr(self, name) < 1:
                raise ValueError(f"layout.{name}: must be >= 1, got {getattr(self, name)}")
        if self.pp_schedule not in SCHEDULES:
            raise ValueError(f"parallel.pp_schedule: {self.pp_schedule!r} is not one of {SCHEDULES}")
        if self.ac not in AC_MODES:
            raise ValueError(f"parallel.ac: {self.ac!r} is not one of {AC_MODES}")
        if self.dtype not in DTYPES:
            raise ValueError(f"precision.dtype: {self.dtype!r} is not one of {DTYPES}")
        if model.n_heads % self.tp or model.kv_heads % self.tp:
            raise ValueError(f"parallel.tp: {self.tp} must divide model.n_heads={model.n_heads} "
                             f"and the kv heads ({model.kv_heads})")
        if model.hidden % self.tp:
            raise ValueError(f"parallel.tp: {self.tp} must divide the MLP width {model.hidden}")
        if self.ep > 1 and (not model.moe_experts or model.moe_experts % self.ep or self.dp_shard % self.ep):
            raise ValueError(f"parallel.ep: {self.ep} must divide model.moe_experts={model.moe_experts} and "
                             f"parallel.dp_shard={self.dp_shard} (the experts are split over ranks of dp_shard)")
        if self.ep > 1 and self.ac == "selective":
            raise ValueError("parallel.ac: 'selective' is not supported with parallel.ep > 1 (the trainer refuses it); "
                             "use 'full' or 'none'")
        if self.sp and self.tp == 1:
            raise ValueError("parallel.sp: sequence parallel needs parallel.tp > 1")
        if self.sp and (self.seq_len // self.cp) % self.tp:
            raise ValueError(f"train.seq_len: {self.seq_len} / cp must be divisible by parallel.tp={self.tp} under sp")
        if self.seq_len % (2 * self.cp):
            raise ValueError(f"parallel.cp: {self.cp} needs train.seq_len divisible by 2 x cp, got {self.seq_len}")
        if self.cp > 1 and self.pp > 1:
            raise ValueError("parallel.cp: context parallel with pipeline parallel is not built")
        if self.pp_virtual_stages > 1 and self.pp_schedule != "interleaved_1f1b":
            raise ValueError("parallel.pp_virtual_stages > 1 needs parallel.pp_schedule = 'interleaved_1f1b'")
        if self.pp_schedule == "interleaved_1f1b" and self.pp == 1:
            raise ValueError("parallel.pp_schedule = 'interleaved_1f1b' needs parallel.pp > 1")
        chunks = self.pp * self.pp_virtual_stages
        if chunks > model.n_layers:
            raise ValueError(f"parallel.pp x pp_virtual_stages = {chunks} exceeds model.n_layers={model.n_layers}")
        if self.pp > 1 and self.microbatches < self.pp and self.pp_schedule != "gpipe":
            raise ValueError(f"parallel.pp_microbatches: {self.microbatches} must be >= parallel.pp={self.pp} "
                             f"for {self.pp_schedule}")
        if self.pp_virtual_stages > 1 and self.microbatches % self.pp:
            raise ValueError(f"parallel.pp_microbatches: {self.microbatches} must be a multiple of "
                             f"parallel.pp={self.pp} for the interleaved schedule")
        if self.seq_len > model.max_seq_len and model.position in ("learned", "sinusoidal"):
            raise ValueError(f"train.seq_len: {self.seq_len} exceeds model.max_seq_len={model.max_seq_len}")

    def layers_per_chunk(self, model: ModelConfig) -> int:
        """Layers on the fullest model chunk (torch's pipelining splits unevenly when it must)."""
        chunks = self.pp * self.pp_virtual_stages
        return -(-model.n_layers // chunks)

    def overrides(self) -> list[str]:
        """The run-config overrides that select this layout."""
        o = ["--parallel.tp", str(self.tp), "--parallel.pp", str(self.pp),
             "--parallel.dp_replicate", str(self.dp_replicate), "--parallel.dp_shard", str(self.dp_shard)]
        if self.pp > 1:
            o += ["--parallel.pp_schedule", self.pp_schedule, "--parallel.pp_microbatches", str(self.microbatches)]
            if self.pp_virtual_stages > 1:
                o += ["--parallel.pp_virtual_stages", str(self.pp_virtual_stages)]
            o += ["--train.batch_size", str(self.batch_per_dp_rank), "--train.grad_accum", "1"]
        else:   # without PP, train.batch_size is one accumulation step's batch
            o += ["--train.batch_size", str(self.micro_batch), "--train.grad_accum", str(self.microbatches)]
        if self.ep > 1:
            o += ["--parallel.ep", str(self.ep)]
        o += ["--parallel.sp", "true" if self.sp else "false", "--parallel.ac", self.ac,
              "--precision.dtype", self.dtype, "--train.seq_len", str(self.seq_len)]
        if self.cp > 1:
            o += ["--parallel.cp", str(self.cp)]
        return o

    def short(self) -> str:
        v = f"x{self.pp_virtual_stages}" if self.pp_virtual_stages > 1 else ""
        ep = f" ep{self.ep}" if self.ep > 1 else ""
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return (f"tp{self.tp}{'+sp' if self.sp else ''}{cp} pp{self.pp}{v} dp{self.dp_replicate}x{self.dp_shard}{ep} "
                f"mb{self.micro_batch}x{self.microbatches} {self.pp_schedule if self.pp > 1 else '-'} ac={self.ac}")

    def to_dict(self) -> dict:
        return asdict(self)

    replace = replace


@dataclass(frozen=True)
class Stack:
    """What the software does, as far as cost goes. The default is meshformer's own trainer
    (torch FSDP2/DDP, SDPA flash attention); `megatron_sc21()` describes the 2021 Megatron-LM
    runs of Narayanan et al. so their published figures can be checked with the same hardware
    constants."""
    flash_attention: bool = True        # False: the T x T scores are written to memory (softmax, dropout)
    dropout: bool = False               # dropout masks (attention probabilities, two residual branches)
    dp_overlap: bool = True             # gradient reduction overlaps the last backward
    master_weights_bytes: int = 4       # fp32 parameters kept by the optimizer
    model_weights_bytes: int = 0        # extra low-precision weight copy kept between steps (Megatron: 2)
    grad_bytes: int = 4                 # gradients as accumulated and reduced
    optimizer_bytes: int = 8            # Adam m and v in fp32
    fused_elementwise: bool = False     # bias-GELU / bias-dropout-add / scale-mask-softmax fused kernels
    # How sharded data parallelism issues its collectives: "unit" = one all-gather / reduce-scatter per
    # FSDP unit (a layer; torch FSDP2), "tensor" = one per parameter tensor (DeepSpeed ZeRO-3 as of
    # 2021). Each collective pays the ring's latency over all its ranks, so this decides how fast
    # latency grows with the number of GPUs. dp_reduce_bucket > 0: gradients reduce-scattered in
    # buckets of that many elements instead (DeepSpeed's reduce_bucket_size).
    dp_gather: str = "unit"
    dp_reduce_bucket: int = 0


def megatron_sc21() -> Stack:
    # Megatron-LM as in arXiv 2104.04473: fp16 weights + fp32 master copy, fp32 gradient buffer
    # reduced after backward (no overlap yet), materialised softmax with fused kernels, dropout 0.1.
    return Stack(flash_attention=False, dropout=True, dp_overlap=False, master_weights_bytes=4,
                 model_weights_bytes=2, grad_bytes=4, optimizer_bytes=8, fused_elementwise=True)


def deepspeed_zero3_sc21() -> Stack:
    # The ZeRO-3 rows of Narayanan et al. Table 2: the same Megatron model code under DeepSpeed's
    # ZeRO-3 of 2021, which all-gathered each parameter tensor separately
    # (partition_parameters._allgather_param; coalesced gathers came later), reduce-scattered fp16
    # gradients in buckets of reduce_bucket_size = 5e8 elements (its default), and waited for each
    # gather before the module ran (no overlap assumed, as for the Megatron stack).
    return replace(megatron_sc21(), dp_gather="tensor", dp_reduce_bucket=500_000_000, grad_bytes=2)
