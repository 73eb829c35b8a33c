"""Per-step metrics to the console (one human line per logged step, trainer/console.py; a progress
bar on a terminal), a JSONL file, TensorBoard and optional trackers (trainer/trackers.py)."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from trainer.console import step_line

# Dense peak matrix TFLOP/s per GPU (vendor datasheets, no sparsity). Overridable by
# metrics.peak_tflops. A100 has no fp8: its fp8 entry is its bf16 peak.
PEAK_TFLOPS = {
    "a100": {"bf16": 312.0, "fp8": 312.0, "fp32": 19.5},
    "h100": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "b200": {"bf16": 2250.0, "fp8": 4500.0, "fp32": 80.0},
}


def peak_flops(device: torch.device, dtype: str, override_tflops: float, cpu_tflops: float,
               measure_cpu: Callable[[], float]) -> float:
    """Peak FLOP/s of one device for MFU: the override, else the GPU's datasheet figure, else on
    CPU `cpu_tflops`, or when that is 0 what `measure_cpu()` times (trainer/roofline.py)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return cpu_tflops * 1e12 if cpu_tflops > 0 else measure_cpu()
    name = torch.cuda.get_device_name(device).lower()
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(dtype, table["bf16"]) * 1e12
    raise RuntimeError(f"metrics.peak_tflops: unknown GPU {name!r}; set metrics.peak_tflops for MFU")


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2**20


def trim_after(path: Path, step: int) -> None:
    """Drop rows logged after `step`: a run resumed from the checkpoint at `step` logs those
    steps again, and each step should appear once. The file is replaced atomically."""
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        tmp.replace(path)


def strict(value):
    """JSON has no NaN or Infinity: a non-finite number is written as null (metrics.jsonl stays
    strict JSON that any parser reads; a null loss means the value was not finite)."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLogger:
    """Writes on the main process only; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path, enabled: bool, total_steps: int, start_step: int = 0,
                 progress: bool = True, tensorboard: bool = True, sinks=()):
        self.enabled = enabled
        self.bar = self.tb = self.file = None
        self.sinks = list(sinks)        # trackers (wandb, MLflow): log(row, step), close()
        self.total = total_steps
        self._first_step_t, self._steps_since = None, 0       # for the ETA
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = path = run_dir / "metrics.jsonl"
        if path.exists():
            trim_after(path, start_step)
        self.file = open(path, "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(log_dir=str(run_dir / "tb"))
        if progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=sys.stderr, disable=None)
            if self.bar.disable:    # not a terminal (CI, Slurm log): the step lines alone
                self.bar = None

    def eta_s(self, step: int) -> float | None:
        """Seconds left at the mean pace since the first step of this process (the first step,
        with its warm-up, is not counted; evaluations and saves are: they are part of the wait)."""
        if self._first_step_t is None or self._steps_since < 1:
            return None
        pace = (time.perf_counter() - self._first_step_t) / self._steps_since
        return max(0, self.total - step) * pace

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {key: strict(value) for key, value in row.items()}
        row["time"] = round(time.time(), 3)
        self.file.write(json.dumps(row, allow_nan=False) + "\n")
        step = row["step"]
        if self.tb is not None:
            for key, value in row.items():
                if key not in ("step", "time") and isinstance(value, (int, float)):
                    self.tb.add_scalar(("val/" if key.startswith("val") else "train/") + key, value, step)
        for sink in self.sinks:
            sink.log(row, step)
        line = step_line(row, self.total, self.eta_s(step))
        if line is not None:
            self.say(line)

    def say(self, line: str) -> None:
        """A line on stdout, above the progress bar when there is one."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def rewind(self, step: int) -> None:
        """Forget the rows after `step`: a run rolled back to its checkpoint at `step` trains
        those steps again (on other data), and each step should appear once."""
        if not self.enabled:
            return
        self.file.close()
        trim_after(self.path, step)
        self.file = open(self.path, "a", buffering=1)
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def advance(self, steps: int = 1) -> None:
        if self._first_step_t is None:
            self._first_step_t = time.perf_counter()
        else:
            self._steps_since += steps
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for sink in self.sinks:
            sink.close()
        self.sinks = []
        if self.tb is not None:
            self.tb.close()
        if self.file is not None:
            self.file.close()
