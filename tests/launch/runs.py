"""A tiny run config and the commands that train it under each launcher."""
from __future__ import annotations

from pathlib import Path

TINY = """
[run]
seed = 3
[model]
vocab_size = 320
dim = 64
n_layers = 2
n_heads = 4
n_kv_heads = 4
max_seq_len = 64
[train]
steps = {steps}
batch_size = 2
seq_len = 32
eval_every = 0
eval_batches = 1
device = "cpu"
threads = 1
[optim]
lr = 3e-3
warmup_steps = 5
[checkpoint]
every = {every}
keep = 2
[metrics]
log_every = 1
progress = false
tensorboard = false
"""


def write_config(folder: Path, steps: int = 12, every: int = 0, extra: str = "") -> Path:
    path = folder / "run.toml"
    path.write_text(TINY.format(steps=steps, every=every) + extra)
    return path
