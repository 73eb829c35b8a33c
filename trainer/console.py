"""The human lines a run prints: one per logged step, one per evaluation, one at the end.

They go to stdout whether or not it is a terminal (piped output and Slurm log files get them too;
on a terminal a progress bar stays below them), in the shape Megatron and torchtitan print:
`step 40/600 | loss 2.345 | lr 1.2e-03 | 14.2k tok/s | mfu 1.2% | mem 0.8 GiB | eta 1m23s`.
The machine-readable rows are metrics.jsonl's, never the console's."""
from __future__ import annotations

import math


def duration(seconds: float) -> str:
    """`45s`, `1m23s`, `2h05m`: short enough for a log line, exact enough for an ETA."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _num(value, fmt: str) -> str:
    # metrics rows carry None for a value that was not finite (strict JSON): show it as nan
    return "nan" if value is None else format(value, fmt)


def _rate(tokens_per_s: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if tokens_per_s >= div:
            return f"{tokens_per_s / div:.1f}{unit}"
    return f"{tokens_per_s:.0f}"


def step_line(row: dict, total: int, eta_s: float | None) -> str | None:
    """The console line of one metrics row, or None for a row that is not worth one (a rollback
    row: its message is printed by the loop)."""
    head = f"step {row['step']}/{total}"
    if "loss" in row:
        parts = [head, f"loss {_num(row['loss'], '.4f')}"]
        if "grad_norm" in row:
            parts.append(f"grad {_num(row['grad_norm'], '.3g')}")
        if row.get("lr") is not None:
            parts.append(f"lr {row['lr']:.2e}")
        if row.get("tokens_per_s") is not None:
            parts.append(f"{_rate(row['tokens_per_s'])} tok/s")
        if row.get("mfu") is not None:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        if row.get("peak_mem_gib") is not None:
            parts.append(f"mem {row['peak_mem_gib']:.1f} GiB")
        if eta_s is not None:
            parts.append(f"eta {duration(eta_s)}")
        return " | ".join(parts)
    if "val_loss" in row:
        ppl = f" | val ppl {_num(row['val_ppl'], '.4g')}" if "val_ppl" in row else ""
        return f"{head} | val loss {_num(row['val_loss'], '.4f')}{ppl}"
    if "skipped" in row:
        return f"{head} | skipped: {row['skipped']}"
    return None


def closing_line(summary: dict, total: int, checkpoint: str | None, stopped_by: str = "") -> str:
    """The last line of a run: what was done, what it reached, where it is saved, how long."""
    steps, val = summary["steps"], summary.get("final_val_loss")
    if stopped_by:
        what = f"stopped by {stopped_by} at step {steps}/{total}"
    else:
        what = f"done: {steps}/{total} steps"
    parts = [what, f"{duration(summary['wall_s'])}"]
    if val is not None and math.isfinite(val):
        parts.append(f"final validation loss {val:.4f} (ppl {math.exp(min(val, 700)):.4g})")
    elif summary.get("final_loss") is not None and math.isfinite(summary["final_loss"]):
        parts.append(f"final training loss {summary['final_loss']:.4f} (no validation run)")
    parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint saved")
    line = " | ".join(parts)
    if stopped_by:
        line += "; run the same command again to resume"
    return line


def complete_line(run_dir: str, step: int, total: int, checkpoint: str) -> str:
    """What a rerun of a finished run says instead of training (exit 0)."""
    where = "is already complete" if step == total else f"is at step {step}, beyond train.steps = {total}"
    return (f"run {run_dir} {where} (checkpoint {checkpoint}); nothing to do. To train on, raise train.steps: "
            f"--train.steps {max(2 * step, step + 1)} (the LR schedule is recomputed for the new length), or start "
            "over with --run.overwrite true")
