import json

import pytest

from tests.trainer.fixtures import fixed_factory
from core.run_config import load_config
from core.errors import ConfigError
from trainer.train import train

SMALL = ["--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--train.seq_len", "32",
         "--train.batch_size", "4", "--metrics.progress", "false", "--optim.warmup_steps", "2",
         "--train.eval_batches", "2", "--metrics.log_every", "1", "--checkpoint.every", "0"]


def run(tmp_path, name, *extra, batches=4):
    cfg = load_config("configs/tiny.toml", SMALL + ["--run.dir", str(tmp_path / name), *extra])
    summary = train(cfg, loader_factory=fixed_factory(n=batches))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, rows


def losses(rows):
    return [r["loss"] for r in rows if "loss" in r]


def test_same_seed_same_losses_other_seed_differs(tmp_path):
    _, a = run(tmp_path, "a", "--train.steps", "8")
    _, b = run(tmp_path, "b", "--train.steps", "8")
    _, c = run(tmp_path, "c", "--train.steps", "8", "--run.seed", "1")
    assert losses(a) == losses(b)
    assert losses(a) != losses(c)


def test_overfits_a_fixed_batch(tmp_path):
    summary, rows = run(tmp_path, "fit", "--train.steps", "60", "--optim.lr", "1e-2", "--optim.schedule", "constant",
                        batches=1)
    first, last = losses(rows)[0], losses(rows)[-1]
    assert first > 5.0            # ~ln(320) at initialisation
    assert last < 0.5, losses(rows)


def test_run_folder_holds_config_metrics_tensorboard_checkpoint(tmp_path):
    summary, rows = run(tmp_path, "r", "--train.steps", "4", "--train.grad_accum", "2", "--train.eval_every", "2")
    d = tmp_path / "r"
    assert load_config(d / "config.toml").train.grad_accum == 2
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens"):
        assert all(key in r for r in train_rows), key
    assert train_rows[-1]["tokens"] == 4 * 2 * 4 * 32
    # MFU divides by this process's matmuls timed at the model's shapes (trainer/roofline.py): a
    # step does those GEMMs and more, so its share of their rate lies in (0, 1)
    assert all(0 < r["mfu"] < 1 for r in train_rows), [r["mfu"] for r in train_rows]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2, 4]   # 0: before training
    assert summary["steps"] == 4 and summary["final_val_loss"] == rows[-1]["val_loss"]
    assert (d / "checkpoints" / "step-00000004" / "COMPLETE").exists()
    # TensorBoard's own reader sees the scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(d / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert len(acc.Scalars("val/val_loss")) == 3


def test_bf16_autocast_trains(tmp_path):
    summary, rows = run(tmp_path, "bf16", "--train.steps", "20", "--precision.dtype", "bf16", batches=1)
    assert losses(rows)[-1] < losses(rows)[0] - 1.0


def test_existing_run_without_checkpoint_needs_overwrite(tmp_path, monkeypatch):
    run(tmp_path, "x", "--train.steps", "2", "--checkpoint.final", "false")
    with pytest.raises(ConfigError, match="run.overwrite"):
        run(tmp_path, "x", "--train.steps", "2")
    # under Slurm the job's log may sit in the run folder (the sbatch default): the live one stays
    monkeypatch.setenv("SLURM_JOB_ID", "12")
    (tmp_path / "x" / "slurm-11.out").write_text("the old job")
    (tmp_path / "x" / "slurm-12.out").write_text("this job, still writing")
    run(tmp_path, "x", "--train.steps", "2", "--run.overwrite", "true")
    old = list(tmp_path.glob("x.old-*"))
    assert len(old) == 1 and (old[0] / "metrics.jsonl").exists()     # moved aside, not deleted
    assert (old[0] / "slurm-11.out").exists() and (tmp_path / "x" / "slurm-12.out").exists()
