import csv
import json

import pytest

from scaling.cli import main
from scaling.spec import load_spec
from scaling.store import ResultsStore

from .fake_trainer import BRANCH_PENALTY, LAW
from .helpers import write_spec


def test_sweep_end_to_end_with_fake_trainer(tmp_path, monkeypatch, capsys):
    spec_path = write_spec(tmp_path)
    spec = load_spec(spec_path)
    # one size fails: its base run, hence its branches (no checkpoint), and its scratch runs
    monkeypatch.setenv("FAKE_FAIL", "d48l1")
    assert main(["run", str(spec_path), "--jobs", "2"]) == 1
    store = ResultsStore(spec.results_path)
    rows = {r["run_id"]: r for r in store.rows()}
    assert store.counts() == {"pending": 0, "running": 0, "done": 21, "failed": 7}
    assert "fake failure" in rows["d48l1-lr0.003-s0-base"]["error"]
    assert "is missing" in rows["d48l1-lr0.003-s0-D34304-cd"]["error"]
    capsys.readouterr()
    assert main(["status", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "done 21, failed 7" in out and "d48l1-lr0.003-s0-base" in out

    # re-running skips done runs and, without --retry-failed, failed ones too
    stamp = {r: (tmp_path / "sweep" / "runs" / r / "summary.json").stat().st_mtime_ns
             for r in rows if rows[r]["status"] == "done"}
    monkeypatch.delenv("FAKE_FAIL")
    assert main(["run", str(spec_path), "--jobs", "2"]) == 1
    assert "0 runs to execute, 28 skipped" in capsys.readouterr().out
    assert main(["run", str(spec_path), "--jobs", "2", "--retry-failed"]) == 0
    assert "7 runs to execute, 21 skipped" in capsys.readouterr().out
    assert store.counts()["done"] == 28
    for r, t in stamp.items():
        assert (tmp_path / "sweep" / "runs" / r / "summary.json").stat().st_mtime_ns == t
    assert store.get("d48l1-lr0.003-s0-base")["attempts"] == 2

    # collect: branch points, the measured gap to the same points from scratch, compute saved
    assert main(["collect", str(spec_path)]) == 0
    out = capsys.readouterr().out
    assert "12 points" in out and "% saved" in out and "over 12 pairs" in out
    assert f"mean {BRANCH_PENALTY:+.4f}" in out
    points = list(csv.DictReader((tmp_path / "sweep" / "points.csv").open()))
    assert len(points) == 12 and {p["kind"] for p in points} == {"branch"}

    # fit: the fake's law, recovered from 12 noisy points, and the IsoFLOP minima
    assert main(["fit", str(spec_path), "--top-k", "16"]) == 0
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert len(fit["isoflop"]["minima"]) == 3
    assert all(m["interior"] for m in fit["isoflop"]["minima"])
    assert fit["isoflop"]["n_opt"]["exponent"] == pytest.approx(0.5, abs=0.15)   # alpha = beta
    assert fit["chinchilla"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.15)
    assert main(["plot", str(spec_path)]) == 0
    for name in ("isoflop", "frontier", "loss_vs_n_d", "residuals"):
        png = tmp_path / "sweep" / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_branch_that_ignored_its_checkpoint_is_failed(tmp_path, monkeypatch):
    spec_path = write_spec(tmp_path, replace={"dims = [32, 48, 64, 96]": "dims = [32]",
                                              "compare_from_scratch = true": "compare_from_scratch = false"})
    monkeypatch.setenv("FAKE_IGNORE_INIT", "1")
    assert main(["run", str(spec_path)]) == 1
    rows = ResultsStore(load_spec(spec_path).results_path).rows(kind="branch")
    assert len(rows) == 3
    assert all(r["status"] == "failed" and "did not start from checkpoint.init_from" in r["error"] for r in rows)


def test_fit_csv_from_elsewhere(tmp_path, capsys):
    import numpy as np
    rng = np.random.default_rng(0)
    path = tmp_path / "pts.csv"
    with path.open("w") as f:
        f.write("params,tokens,final\n")
        for _ in range(80):
            n, d = 10 ** rng.uniform(7, 10), 10 ** rng.uniform(9, 12)
            f.write(f"{n},{d},{(1.7 + 400 / n ** 0.34 + 1100 / d ** 0.3) * np.exp(rng.normal(0, 0.002))}\n")
    out = tmp_path / "fit.json"
    assert main(["fit", "--csv", str(path), "--n-col", "params", "--d-col", "tokens", "--loss-col", "final",
                 "--out", str(out), "--bootstrap", "8", "--top-k", "8"]) == 0
    fit = json.loads(out.read_text())["chinchilla"]
    assert set(fit) >= {"E", "A", "B", "alpha", "beta", "intervals"}
    assert fit["alpha"] == pytest.approx(0.34, abs=0.03) and fit["E"] == pytest.approx(1.7, rel=0.05)
    assert set(fit["intervals"]) == {"E", "A", "B", "alpha", "beta"} and fit["n_bootstrap"] == 8
    assert "fit: bootstrap resamples: 8 done in" in capsys.readouterr().err      # a long fit says how long
    assert main(["fit", "--csv", str(path), "--n-col", "nope", "--out", str(out)]) == 2
    assert "no column(s) ['nope', 'D', 'loss']" in capsys.readouterr().err


def test_grid_sweep_without_budgets_fits_and_plots(tmp_path):
    spec_path = write_spec(tmp_path, replace={
        'kind = "isoflop"\nbudgets = [6e9, 1.2e10, 2.4e10]': 'kind = "grid"\ntokens = [8000, 16000]',
        "dims = [32, 48, 64, 96]": "dims = [32, 64, 96]", "enabled = true": "enabled = false"})
    assert main(["run", str(spec_path), "--jobs", "2"]) == 0
    assert main(["fit", str(spec_path), "--top-k", "8"]) == 0
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert fit["n_points"] == 6 and "isoflop" not in fit and "chinchilla" in fit
    assert main(["plot", str(spec_path)]) == 0
    plots = sorted(p.name for p in (tmp_path / "sweep" / "plots").iterdir())
    assert plots == ["frontier.png", "loss_vs_n_d.png", "residuals.png"]


def test_branches_wait_for_their_base_run_when_running_in_parallel(tmp_path):
    spec_path = write_spec(tmp_path, replace={"dims = [32, 48, 64, 96]": "dims = [32, 48]",
                                              "compare_from_scratch = true": "compare_from_scratch = false"})
    assert main(["run", str(spec_path), "--jobs", "3"]) == 0
    rows = ResultsStore(load_spec(spec_path).results_path).rows()
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)
