"""fp8 (torchao) through the real training loop: loss parity with bf16, and checkpoints that move
between precisions."""
import json

import pytest
import torch

from tests.precision.markov import MarkovBatches, markov_factory
from tests.trainer.fixtures import fixed_factory
from trainer.checkpoint import complete_checkpoints, load_model_weights
from core.run_config import load_config
from trainer.model import Transformer
from trainer.train import train

TINY = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "4", "--model.max_seq_len", "64",
        "--train.seq_len", "64", "--train.batch_size", "8", "--train.eval_batches", "1", "--train.threads", "1",
        "--metrics.progress", "false", "--metrics.tensorboard", "false", "--checkpoint.every", "0"]


def run(tmp_path, name, *extra, factory=None):
    cfg = load_config("configs/tiny.toml", TINY + ["--run.dir", str(tmp_path / name), *extra])
    summary = train(cfg, loader_factory=factory or fixed_factory(n=1))
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return summary, {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.slow
def test_fp8_200_steps_ends_within_2_percent_of_bf16(tmp_path):
    common = ["--train.steps", "200", "--metrics.log_every", "10", "--optim.warmup_steps", "20", "--train.seq_len", "32"]
    bf16, bf16_losses = run(tmp_path, "bf16", "--precision.dtype", "bf16", *common, factory=markov_factory())
    fp8, fp8_losses = run(tmp_path, "fp8", "--precision.dtype", "fp8", *common, factory=markov_factory())
    floor = MarkovBatches(320, 64, 8).entropy()
    # it learned the chain: from ~ln(320) = 5.8 to well on the way to the chain's entropy
    assert bf16_losses[10] - bf16["final_loss"] > 2.0 and bf16["final_loss"] < floor + 1.0, (bf16_losses, floor)
    assert fp8_losses != bf16_losses                                         # fp8 really ran
    assert abs(fp8["final_loss"] - bf16["final_loss"]) <= 0.02 * bf16["final_loss"], (fp8_losses, bf16_losses)


@pytest.mark.slow
def test_save_in_fp8_resume_in_bf16(tmp_path):
    fast = ["--optim.lr", "1e-2", "--optim.warmup_steps", "2", "--optim.schedule", "constant",
            "--metrics.log_every", "1"]
    _, straight = run(tmp_path, "straight", "--precision.dtype", "fp8", "--train.steps", "10", *fast)
    run(tmp_path, "r", "--precision.dtype", "fp8", "--train.steps", "6", "--checkpoint.every", "3", *fast)
    summary, resumed = run(tmp_path, "r", "--precision.dtype", "bf16", "--train.steps", "10", *fast)
    assert summary["steps"] == 10 and sorted(resumed) == list(range(1, 11))
    assert straight[1] - straight[7] > 0.5, straight
    # the bf16 continuation picks up where fp8 left off (only the rounding differs)
    for step in (7, 10):
        assert abs(resumed[step] - straight[step]) <= 0.02 * straight[step], (step, resumed, straight)
    # the checkpoint holds plain fp32 weights that an fp32 model (an export) loads as is
    cfg = load_config(tmp_path / "r" / "config.toml")
    exported = Transformer(cfg.model)
    fresh = {k: v.clone() for k, v in exported.state_dict().items()}
    load_model_weights(exported, complete_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert all(v.dtype == torch.float32 for v in exported.state_dict().values())
    assert not torch.equal(fresh["layers.0.attention.wq.weight"], exported.state_dict()["layers.0.attention.wq.weight"])
