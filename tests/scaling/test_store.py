import csv
import multiprocessing as mp

import pytest

from scaling.store import ResultsStore


def _writer(path, worker, n_runs):
    store = ResultsStore(path)
    for i in range(n_runs):
        run_id = f"w{worker}-r{i}"
        store.register({"run_id": run_id, "config_hash": f"h{i}", "kind": "scratch", "D": 1e6 * (i + 1)})
        store.mark_running(run_id)
        store.mark_done(run_id, {"final_loss": worker + i / 100, "tokens": 1e6, "wall_s": 0.1})
        store.mark_running("shared")        # everyone bumps the same row: lost updates would show


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "results.sqlite"
    store = ResultsStore(path)
    store.register({"run_id": "shared", "config_hash": "x"})
    workers, n_runs = 4, 20
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, w, n_runs)) for w in range(workers)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = {r["run_id"]: r for r in store.rows()}
    assert len(rows) == workers * n_runs + 1
    assert rows["shared"]["attempts"] == workers * n_runs
    for w in range(workers):
        for i in range(n_runs):
            r = rows[f"w{w}-r{i}"]
            assert r["status"] == "done" and r["attempts"] == 1
            assert r["final_loss"] == pytest.approx(w + i / 100)
    assert store.counts()["done"] == workers * n_runs


def test_lifecycle_reset_on_new_config_and_csv(tmp_path):
    store = ResultsStore(tmp_path / "r.sqlite")
    store.register({"run_id": "a", "config_hash": "h1", "n_params": 10})
    store.mark_running("a")
    store.mark_failed("a", "boom")
    assert store.get("a")["status"] == "failed" and store.get("a")["error"] == "boom"
    store.mark_running("a")
    store.mark_done("a", {"final_loss": 3.5, "final_val_loss": 3.6, "n_params": 12})
    r = store.get("a")
    assert (r["status"], r["attempts"], r["n_params"], r["error"]) == ("done", 2, 12, None)
    store.register({"run_id": "a", "config_hash": "h1"})          # same config: result kept
    assert store.get("a")["status"] == "done"
    store.register({"run_id": "a", "config_hash": "h2"})          # changed config: redo
    assert store.get("a")["status"] == "pending" and store.get("a")["final_loss"] is None
    out = store.export_csv(tmp_path / "r.csv")
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["run_id"] == "a" and rows[0]["config_hash"] == "h2"
    with pytest.raises(KeyError, match="plan the sweep first"):
        store.mark_running("nope")
