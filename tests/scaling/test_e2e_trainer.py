"""The tiny sweep (3 budgets x 4 sizes) with the real trainer, run here, collected, fitted, plotted."""
import json
import sys

import pytest

from scaling.cli import main
from scaling.spec import load_spec
from scaling.store import ResultsStore

from .helpers import write_spec


@pytest.mark.slow
def test_tiny_sweep_with_the_real_trainer(tmp_path, capsys):
    pytest.importorskip("data").build_loader      # the trainer's data stream
    trainer = [sys.executable, "-m", "trainer", "train"]
    # cooldown branches (checkpoint.init_from) from one constant-LR run per size
    replace = {"compare_from_scratch = true": "compare_from_scratch = false"}
    n_runs, kind = 16, "branch"
    replace["budgets = [6e9, 1.2e10, 2.4e10]"] = "budgets = [3e9, 6e9, 1.2e10]"   # half the README's
    spec_path = write_spec(tmp_path, trainer=trainer, replace=replace)
    spec = load_spec(spec_path)
    assert main(["run", str(spec_path), "--jobs", "2"]) == 0, ResultsStore(spec.results_path).rows(status="failed")
    rows = ResultsStore(spec.results_path).rows()
    assert len(rows) == n_runs and all(r["status"] == "done" for r in rows)
    for r in rows:
        summary = json.loads((tmp_path / "sweep" / "runs" / r["run_id"] / "summary.json").read_text())
        assert r["n_params"] == summary["n_params"]          # the plan's N is the model's N
        assert r["tokens"] == r["D"] or r["kind"] == "base"
        assert 0 < r["final_val_loss"] < 6.0                   # below ln(320) = 5.77: it learned
    capsys.readouterr()
    assert main(["run", str(spec_path), "--jobs", "2"]) == 0
    assert f"0 runs to execute, {n_runs} skipped" in capsys.readouterr().out
    assert main(["collect", str(spec_path)]) == 0
    assert main(["fit", str(spec_path), "--top-k", "16"]) == 0
    fit = json.loads((spec.out_dir / "fit.json").read_text())
    assert fit["n_points"] == 12
    iso = fit["isoflop"]        # each budget: a parabola minimum, or skipped with the reason
    assert len(iso["minima"]) + sum(r.startswith("budget ") for r in iso["skipped"]) == 3
    assert len(iso["dropped"]) == sum(r.startswith("budget ") for r in iso["skipped"])    # named on isoflop.png
    # 12 tiny points barely constrain the law (E can go to 0): check it is a law, not its values
    c = fit["chinchilla"]
    assert c["E"] >= 0 and c["A"] > 0 and c["B"] > 0 and c["alpha"] > 0 and c["beta"] > 0
    assert main(["plot", str(spec_path)]) == 0
    assert (spec.out_dir / "plots" / "loss_vs_n_d.png").exists()
    points = (spec.out_dir / "points.csv").read_text()
    assert points.count(f",{kind},") == 12
