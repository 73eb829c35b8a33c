"""Results store: one row per run in an SQLite file that the runs of a sweep (local processes or
Slurm array tasks) write to concurrently. sqlite3 is in the standard library and does the locking;
each write is one short `BEGIN IMMEDIATE` transaction with a long busy timeout, and the rollback
journal (not WAL) is used because WAL needs shared memory, which network file systems lack."""
from __future__ import annotations

import csv
import os
import socket
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

# column -> SQL type; the plan fills the first block, the run the second
COLUMNS = {
    "run_id": "TEXT PRIMARY KEY", "config_hash": "TEXT", "kind": "TEXT", "is_branch": "INTEGER",
    "parent": "TEXT", "size": "TEXT", "n_params": "INTEGER", "n_params_non_embedding": "INTEGER",
    "D": "REAL", "C": "REAL", "budget": "REAL", "lr": "REAL", "batch_size": "INTEGER",
    "seed": "INTEGER", "steps_planned": "INTEGER", "run_dir": "TEXT",
    "status": "TEXT", "final_loss": "REAL", "final_val_loss": "REAL", "tokens": "REAL",
    "steps": "INTEGER", "wall_s": "REAL", "attempts": "INTEGER", "host": "TEXT", "pid": "INTEGER",
    "slurm_job": "TEXT", "error": "TEXT", "updated_at": "REAL", "parametrization": "TEXT", "dim": "INTEGER",
    "variant": "TEXT", "n_params_all": "INTEGER",
}
PLAN_FIELDS = ["config_hash", "kind", "is_branch", "parent", "size", "n_params",
               "n_params_non_embedding", "D", "C", "budget", "lr", "batch_size", "seed",
               "steps_planned", "run_dir", "parametrization", "dim", "variant", "n_params_all"]
STATUSES = ("pending", "running", "done", "failed")   # and "preempted": saved on a signal, resumes


class ResultsStore:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._tx() as db:
            cols = ", ".join(f"{k} {v}" for k, v in COLUMNS.items())
            db.execute(f"CREATE TABLE IF NOT EXISTS runs ({cols})")
            have = {r["name"] for r in db.execute("PRAGMA table_info(runs)")}
            for k in COLUMNS.keys() - have:          # a store written before the column existed
                db.execute(f"ALTER TABLE runs ADD COLUMN {k} {COLUMNS[k]}")

    @contextmanager
    def _tx(self):
        db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("BEGIN IMMEDIATE")     # take the write lock up front: no upgrade deadlocks
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.close()

    def register(self, run: dict) -> None:
        """Add a planned run as pending, or refresh its planned fields; a run whose config hash
        changed since it ran is reset to pending (its old result belongs to another config)."""
        vals = {k: run.get(k) for k in PLAN_FIELDS}
        with self._tx() as db:
            row = db.execute("SELECT config_hash FROM runs WHERE run_id=?", (run["run_id"],)).fetchone()
            if row is None:
                keys = ["run_id", *PLAN_FIELDS, "status", "attempts", "updated_at"]
                db.execute(f"INSERT INTO runs ({', '.join(keys)}) VALUES ({', '.join('?' * len(keys))})",
                           [run["run_id"], *vals.values(), "pending", 0, time.time()])
            else:
                sets = ", ".join(f"{k}=?" for k in PLAN_FIELDS)
                reset = ", status='pending', final_loss=NULL, final_val_loss=NULL" \
                    if row["config_hash"] != run.get("config_hash") else ""
                db.execute(f"UPDATE runs SET {sets}{reset} WHERE run_id=?", [*vals.values(), run["run_id"]])

    def mark_running(self, run_id: str, slurm_job: str | None = None) -> None:
        self._update(run_id, "status='running', attempts=attempts+1, error=NULL",
                     host=socket.gethostname(), pid=os.getpid(), slurm_job=slurm_job)

    def mark_done(self, run_id: str, summary: dict) -> None:
        self._update(run_id, "status='done', error=NULL",
                     final_loss=summary.get("final_loss"), final_val_loss=summary.get("final_val_loss"),
                     tokens=summary.get("tokens"), steps=summary.get("steps"), wall_s=summary.get("wall_s"),
                     # N as the design counts it: active parameters (a MoE run's top-k experts;
                     # a dense run's are all of them; summaries from before the key: n_params)
                     n_params=summary.get("n_params_active", summary.get("n_params")),
                     n_params_non_embedding=summary.get("n_params_active_non_embedding",
                                                        summary.get("n_params_non_embedding")),
                     n_params_all=summary.get("n_params"))

    def mark_preempted(self, run_id: str, note: str) -> None:
        self._update(run_id, "status='preempted'", error=note)

    def mark_failed(self, run_id: str, error: str) -> None:
        self._update(run_id, "status='failed'", error=error[-2000:])

    def _update(self, run_id, sql_set: str, **fields):
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["updated_at"] = time.time()
        sets = ", ".join([sql_set, *(f"{k}=?" for k in fields)])
        with self._tx() as db:
            cur = db.execute(f"UPDATE runs SET {sets} WHERE run_id=?", [*fields.values(), run_id])
            if cur.rowcount != 1:
                raise KeyError(f"run {run_id!r} is not in {self.path}; plan the sweep first")

    def get(self, run_id: str) -> dict | None:
        rows = self.rows(run_id=run_id)
        return rows[0] if rows else None

    def rows(self, **where) -> list[dict]:
        cond = " AND ".join(f"{k}=?" for k in where) or "1"
        db = sqlite3.connect(self.path, timeout=120)
        db.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in db.execute(f"SELECT * FROM runs WHERE {cond} ORDER BY run_id",
                                                list(where.values()))]
        finally:
            db.close()

    def counts(self) -> dict:
        out = dict.fromkeys(STATUSES, 0)
        for r in self.rows():
            out[r["status"]] = out.get(r["status"], 0) + 1
        return out

    def export_csv(self, path: str | os.PathLike, rows: list[dict] | None = None) -> Path:
        rows = self.rows() if rows is None else rows
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else list(COLUMNS))
            w.writeheader()
            w.writerows(rows)
        return path
