"""Optional experiment trackers fed the same rows as metrics.jsonl: Weights & Biases
(`metrics.wandb`) and MLflow (`metrics.mlflow`). Rank 0 only (MetricsLogger exists only there);
the resolved config is attached to the tracker's run. Installed by the `track` extra
(`pip install "meshformer[track]"`); imported only when switched on, and a missing package is
named in one line before any work starts (`check_trackers`).

A resumed run continues the tracker run it started: the ids are kept in run.dir/trackers.json
(moved aside with the rest of the run by run.overwrite).
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from core.errors import ConfigError

IDS_FILE = "trackers.json"
# what each tracker needs importable, and the extra that installs it
NEEDS = {"wandb": ("wandb",), "mlflow": ("mlflow", "sqlalchemy", "alembic")}


def check_trackers(metrics) -> None:
    """Refuse, before building anything, a tracker switched on whose package is missing."""
    for name, modules in NEEDS.items():
        if getattr(metrics, name):
            missing = [m for m in modules if importlib.util.find_spec(m) is None]
            if missing:
                raise ConfigError(f"metrics.{name} = true needs the {', '.join(missing)} package(s), not installed "
                                  f"here; pip install \"meshformer[track]\" (or set metrics.{name} = false)")


def open_trackers(cfg, run_dir: Path) -> list:
    """The tracker sinks `cfg.metrics` switches on, each opened on its (new or resumed) run."""
    m, sinks = cfg.metrics, []
    ids_path = Path(run_dir) / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    name = cfg.run.name or Path(run_dir).resolve().name
    if m.wandb:
        sinks.append(WandbSink(cfg, run_dir, name, ids.get("wandb")))
        ids["wandb"] = sinks[-1].run_id
    if m.mlflow:
        sinks.append(MlflowSink(cfg, run_dir, name, ids.get("mlflow")))
        ids["mlflow"] = sinks[-1].run_id
    if sinks:
        ids_path.write_text(json.dumps(ids, indent=2) + "\n")
    return sinks


def numeric(row: dict) -> dict:
    """The numbers of a metrics row a tracker plots (step and wall time are its own axes)."""
    return {k: v for k, v in row.items() if k not in ("step", "time") and isinstance(v, (int, float))
            and not isinstance(v, bool)}


class WandbSink:
    """metrics.wandb_mode "auto": $WANDB_MODE when set, else offline: compute nodes often have no
    internet, and an offline run (run.dir/wandb/offline-run-*) uploads later with `wandb sync`."""

    def __init__(self, cfg, run_dir: Path, name: str, run_id: str | None):
        import wandb
        m = cfg.metrics
        mode = m.wandb_mode if m.wandb_mode != "auto" else os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(project=m.wandb_project, name=m.wandb_name or name, dir=str(run_dir), mode=mode,
                              id=run_id, resume="allow", config=cfg.to_dict(),
                              settings=wandb.Settings(console="off", silent=True))
        self.run_id = self.run.id

    def log(self, row: dict, step: int) -> None:
        values = numeric(row)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowSink:
    """metrics.mlflow_tracking_uri "" = a SQLite store in the run folder (run.dir/mlflow.db, the
    artifacts beside it in run.dir/mlartifacts): MLflow 3 refuses its old file store. Look at it
    with `mlflow ui --backend-store-uri sqlite:///runs/tiny/mlflow.db`. The client API is used,
    not mlflow's module-level active run (no global state)."""

    def __init__(self, cfg, run_dir: Path, name: str, run_id: str | None):
        from mlflow import MlflowClient
        m, run_dir = cfg.metrics, Path(run_dir).resolve()
        local = not m.mlflow_tracking_uri
        self.client = MlflowClient(tracking_uri=m.mlflow_tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}")
        if run_id is None:
            exp = self.client.get_experiment_by_name(m.mlflow_experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                m.mlflow_experiment, artifact_location=(run_dir / "mlartifacts").as_uri() if local else None)
            run_id = self.client.create_run(exp_id, run_name=name).info.run_id
            self._log_params(run_id, cfg)
        else:
            self.client.update_run(run_id, status="RUNNING")
        self.run_id = run_id
        self.client.log_text(run_id, cfg.to_toml(), "config.toml")    # this start's config, resumes included

    def _log_params(self, run_id: str, cfg) -> None:
        # Params are write-once in MLflow: logged when the run is created (a resume with other
        # values would be refused); config.toml, the artifact, follows every start.
        from mlflow.entities import Param
        params = [Param(f"{section}.{key}", str(value)[:6000]) for section, table in cfg.to_dict().items()
                  for key, value in table.items()]
        for i in range(0, len(params), 100):       # MLflow takes at most 100 params a batch
            self.client.log_batch(run_id, params=params[i:i + 100])

    def log(self, row: dict, step: int) -> None:
        from mlflow.entities import Metric
        ms = int(row.get("time", time.time()) * 1000)
        metrics = [Metric(k, float(v), ms, step) for k, v in numeric(row).items()]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)
