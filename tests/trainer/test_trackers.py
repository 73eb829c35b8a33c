"""metrics.wandb and metrics.mlflow: the same rows as metrics.jsonl reach an offline W&B run and a
local MLflow store, with the run config attached; a resumed run continues the same tracker runs."""
from __future__ import annotations

import importlib.util
import json

import pytest

from core.errors import ConfigError
from core.run_config import load_config
from trainer.metrics import MetricsLogger
from tests.trainer.wandb_reader import wandb_records
from trainer.trackers import IDS_FILE, check_trackers, open_trackers

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def test_wandb_and_mlflow_get_the_metrics_rows_and_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)          # auto = offline
    run_dir = tmp_path / "run"
    run_dir.mkdir()                   # as train() has it: held (locked) before the trackers open
    cfg = load_config("configs/tiny.toml", ["--run.dir", str(run_dir), "--metrics.wandb", "true",
                                            "--metrics.mlflow", "true", "--optim.lr", "0.0025"])
    rows = [{"step": 1, "loss": 5.5, "lr": 1e-3, "tokens_per_s": 100.0}, {"step": 1, "val_loss": 5.25},
            {"step": 2, "loss": 4.75, "lr": 2e-3, "tokens_per_s": 120.0}]
    for start, batch in ((0, rows[:2]), (1, rows[2:])):       # a run, then its resume
        log = MetricsLogger(run_dir, True, 2, start, progress=False, tensorboard=False,
                            sinks=open_trackers(cfg, run_dir))
        for row in batch:
            log.log(dict(row))
        log.close()
    ids = json.loads((run_dir / IDS_FILE).read_text())

    # W&B, offline: one run id for both starts; the rows by step, the config in the run record
    records = wandb_records(run_dir)
    history = [{i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    assert [(h["_step"], h.get("loss"), h.get("val_loss")) for h in history] == [(1, 5.5, 5.25), (2, 4.75, None)]
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert {r.run_id for r in runs} == {ids["wandb"]}
    config = {i.key or ".".join(i.nested_key): json.loads(i.value_json) for i in runs[0].config.update}
    assert config["optim"]["lr"] == 0.0025 and config["run"]["dir"] == str(run_dir)

    # MLflow, the default store in the run folder: metric histories, params, config.toml artifact
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.resolve() / 'mlflow.db'}")
    run = client.get_run(ids["mlflow"])
    assert run.data.params["optim.lr"] == "0.0025" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")] == [(1, 5.5), (2, 4.75)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "val_loss")] == [(1, 5.25)]
    local = client.download_artifacts(ids["mlflow"], "config.toml", str(tmp_path))
    assert load_config(local).optim.lr == 0.0025
    assert (run_dir / "mlartifacts").is_dir()                # artifacts stay in the run folder


def test_missing_tracker_package_is_named_with_the_extra(monkeypatch):
    cfg = load_config("configs/tiny.toml", ["--metrics.mlflow", "true"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "alembic" else real(name, *a))
    with pytest.raises(ConfigError, match=r'^metrics.mlflow = true needs the alembic package\(s\), not installed '
                                          r'here; pip install "meshformer\[track\]"'):
        check_trackers(cfg.metrics)
    check_trackers(load_config("configs/tiny.toml").metrics)      # both off: nothing needed
