import json

from trainer.metrics import MetricsLogger


def test_resumed_run_logs_each_step_once(tmp_path):
    """A crash after step 5 with the last checkpoint at step 3: steps 4-5 are logged again on resume."""
    log = MetricsLogger(tmp_path, True, 10, progress=False, tensorboard=False)
    for s in range(1, 6):
        log.log({"step": s, "loss": 1.0 / s})
    log.log({"step": 5, "val_loss": 0.5})
    log.close()
    log = MetricsLogger(tmp_path, True, 10, start_step=3, progress=False, tensorboard=False)
    for s in range(4, 7):
        log.log({"step": s, "loss": 2.0})
    log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in rows][3:] == [2.0, 2.0, 2.0]


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "x", False, 10)
    log.log({"step": 1, "loss": 1.0})
    log.close()
    assert not (tmp_path / "x").exists()
