"""The tiny MoE's balancing on the real data stream (issue 19: max/mean expert load under 1.5 after
warm-up): configs/tiny-moe.toml as shipped, its 50 warm-up steps and then the peak LR held (a
constant schedule: the early high-LR steps are where the Switch loss and the expert bias lost
balance, README "Mixture of Experts"), against the same config with the Sinkhorn choice off and the
Switch loss at its default 0.01, which must fail the same bound (so the test can fail, and it is the
Sinkhorn choice that balances)."""
import json

import pytest

from core.run_config import load_config
from trainer.train import train

STEPS, WARMUP, LOG_EVERY = 120, 50, 10
RUN = ["--train.steps", str(STEPS), "--optim.warmup_steps", str(WARMUP), "--optim.schedule", "constant",
       "--train.eval_every", "0", "--checkpoint.every", "0", "--checkpoint.final", "false",
       "--metrics.log_every", str(LOG_EVERY), "--metrics.progress", "false", "--metrics.tensorboard", "false",
       "--train.threads", "2"]


def worst_loads(tmp_path, name: str, extra: list[str]) -> dict[int, float]:
    run_dir = tmp_path / name
    train(load_config("configs/tiny-moe.toml", RUN + ["--run.dir", str(run_dir), *extra]))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["moe_load_max_mean"] for r in rows if "moe_load_max_mean" in r and r["step"] >= WARMUP}


@pytest.mark.slow
def test_sinkhorn_keeps_every_logged_step_under_1_5_and_the_switch_loss_does_not(tmp_path):
    balanced = worst_loads(tmp_path, "sinkhorn", [])
    assert sorted(balanced) == list(range(WARMUP, STEPS + 1, LOG_EVERY))
    # The bound is the issue's. Each logged load is one whole step's (2,048 tokens x 4 picks over 16
    # experts, 512 an expert when even); the 5-seed study (README) logged at most 1.21 from step 50.
    assert max(balanced.values()) < 1.5, balanced
    unbalanced = worst_loads(tmp_path, "switch", ["--model.moe_sinkhorn_iters", "0", "--model.moe_aux_coef", "0.01"])
    assert max(unbalanced.values()) >= 1.5, unbalanced
