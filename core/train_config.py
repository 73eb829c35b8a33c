"""The run-level config sections: `[run]`, `[train]`, `[optim]`, `[metrics]` (the trainer's own;
the other sections live beside them in core/, one file each)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option


@dataclass
class RunConfig:
    dir: str = option("run folder: config.toml, metrics.jsonl, TensorBoard files, checkpoints/", "runs/tiny")
    seed: int = option("seed for initialisation, data order and dropout", 0)
    name: str = option("a label for logs (default: the run folder's name)", "")
    overwrite: bool = option("start fresh in a run folder that already holds a run (its files are moved aside, never deleted)", False)

    def validate(self) -> None:
        if not self.dir:
            raise ValueError("run.dir: must name a folder, e.g. runs/tiny")
        if self.seed < 0:     # numpy's SeedSequence (data order) takes no negative seed
            raise ValueError(f"run.seed: must be >= 0, got {self.seed}")


@dataclass
class TrainConfig:
    steps: int = option("optimizer steps to train", 300)
    batch_size: int = option("sequences per optimizer step per data-parallel rank (per accumulation micro-step)", 16)
    grad_accum: int = option("micro-batches accumulated per optimizer step", 1)
    seq_len: int = option("tokens per sequence", 128)
    eval_every: int = option("evaluate on the validation split every N steps (0 = only at the end)", 100)
    eval_batches: int = option("validation batches per evaluation", 8)
    device: Literal["auto", "cpu", "cuda"] = option("where to train; auto = cuda if available", "auto")
    deterministic: bool = option("use deterministic algorithms (slower on GPU)", False)
    threads: int = option("torch CPU threads per process (0 = torch's default)", 0)
    on_nonfinite: Literal["stop", "skip", "rollback"] = option(
        "when the loss or gradient norm is not finite (checked at logging and evaluation steps and before every "
        "save, no host read per step): stop = exit 1 naming the step, never saving a state that is not finite; skip = "
        "drop that update (one host read per step) and stop after train.max_skips in a row; rollback = reload "
        "the newest checkpoint, skip the data read since, and stop after train.max_rollbacks", "stop")
    max_skips: int = option("on_nonfinite = skip: steps in a row whose update may be dropped; one more stops the run", 5)
    max_rollbacks: int = option("on_nonfinite = rollback: rollbacks in one run; one more divergence stops it", 3)
    memory_check: Literal["error", "warn", "off"] = option(
        "before allocating the model, estimate each process's memory for this layout (the planner's model: "
        "parameters, gradients, optimizer, activations, logits, transients, margin) against the free GPU memory or "
        "the node's available RAM per process: error = refuse a run that cannot fit, naming a layout that would; "
        "warn = say so and start anyway; off = no check", "error")

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "eval_batches", "max_skips", "max_rollbacks"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}: must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0:
            raise ValueError("train.eval_every: must be >= 0 (0 = only at the end)")
        if self.threads < 0:
            raise ValueError(f"train.threads: must be >= 0 (0 = torch's default), got {self.threads}")


@dataclass
class OptimConfig:
    lr: float = option("peak learning rate", 3e-3)
    weight_decay: float = option("decoupled weight decay for matrices (not for norms, biases, embeddings)", 0.1)
    beta1: float = option("AdamW beta1", 0.9)
    beta2: float = option("AdamW beta2", 0.95)
    eps: float = option("AdamW epsilon", 1e-8)
    grad_clip: float = option("clip the global gradient norm to this (0 = no clipping)", 1.0)
    schedule: Literal["cosine", "wsd", "constant"] = option("LR schedule after warmup", "cosine")
    warmup_steps: int = option("linear warmup steps", 30)
    min_lr_ratio: float = option("final LR as a fraction of the peak (cosine, wsd)", 0.1)
    decay_steps: int = option("wsd: length of the final decay phase in steps (0 = use decay_fraction)", 0)
    decay_fraction: float = option("wsd: decay phase as a fraction of train.steps when decay_steps is 0", 0.2)
    decay_shape: Literal["linear", "1-sqrt", "cosine"] = option("wsd: shape of the decay phase", "linear")
    fused: bool = option("use torch's fused AdamW kernel where the device has one", True)

    def validate(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0 <= self.beta1 < 1 or not 0 <= self.beta2 < 1:
            raise ValueError("optim.beta1/beta2: must be in [0, 1)")
        if self.warmup_steps < 0 or self.decay_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, decay_steps, grad_clip and weight_decay must be >= 0")
        if not 0 <= self.min_lr_ratio <= 1 or not 0 <= self.decay_fraction <= 1:
            raise ValueError("optim.min_lr_ratio and optim.decay_fraction must be in [0, 1]")
        if not 0 < self.eps < float("inf"):      # AdamW divides by sqrt(v) + eps
            raise ValueError(f"optim.eps: must be a finite number > 0 (e.g. 1e-8), got {self.eps}")


@dataclass
class MetricsConfig:
    log_every: int = option("log training metrics every N steps", 10)
    progress: bool = option("show a progress bar on the console", True)
    tensorboard: bool = option("write TensorBoard event files to run.dir/tb", True)
    peak_tflops: float = option("peak FLOP/s of one device in TFLOP/s for MFU (0 = look up the device in the table)", 0.0)
    cpu_peak_tflops: float = option("peak TFLOP/s of a CPU process for MFU; 0 = time the model's own GEMMs at start-up "
                                    "(trainer/roofline.py): MFU is then the step's share of the machine's matmul limit", 0.0)
    wandb: bool = option("also log the metrics rows to Weights & Biases (rank 0; needs the `track` extra)", False)
    wandb_project: str = option("W&B project", "meshformer")
    wandb_name: str = option("W&B run name (default: run.name, else the run folder's name)", "")
    wandb_mode: Literal["auto", "offline", "online"] = option(
        "W&B mode; auto = $WANDB_MODE if set, else offline (files in run.dir/wandb; upload later with `wandb sync`)",
        "auto")
    mlflow: bool = option("also log the metrics rows to MLflow (rank 0; needs the `track` extra)", False)
    mlflow_tracking_uri: str = option("MLflow tracking URI (default: a SQLite store run.dir/mlflow.db, artifacts in "
                                      "run.dir/mlartifacts)", "")
    mlflow_experiment: str = option("MLflow experiment name", "meshformer")

    def validate(self) -> None:
        if self.log_every < 1:
            raise ValueError("metrics.log_every: must be >= 1")
        # MFU divides by these: a zero, negative or non-finite peak would crash or mislead.
        if not 0 <= self.peak_tflops < float("inf"):
            raise ValueError(f"metrics.peak_tflops: must be >= 0 (0 = look the device up), got {self.peak_tflops}")
        if not 0 <= self.cpu_peak_tflops < float("inf"):
            raise ValueError(f"metrics.cpu_peak_tflops: must be >= 0 (0 = time the model's GEMMs), got {self.cpu_peak_tflops}")
        if self.wandb and not self.wandb_project.strip():
            raise ValueError("metrics.wandb_project: must name a W&B project when metrics.wandb = true, e.g. meshformer")
        if self.mlflow and not self.mlflow_experiment.strip():
            raise ValueError("metrics.mlflow_experiment: must name an MLflow experiment when metrics.mlflow = true, "
                             "e.g. meshformer")
