"""LR-transfer sweeps ([mup] in a sweep spec): every (width, lr) under sp and muP, the best LR per
width, and its plot."""
from __future__ import annotations

import pytest

from scaling.analysis import lr_transfer
from scaling.plan import plan_sweep
from scaling.spec import SweepSpecError, load_spec
from scaling.store import ResultsStore

from .helpers import write_spec

MUP = "\n[mup]\nbase_dim = 32\n"
GRID = {'kind = "isoflop"\nbudgets = [6e9, 1.2e10, 2.4e10]': 'kind = "grid"\ntokens = [20480]',
        "grid = [1.0]": "grid = [0.5, 1.0, 2.0]", "enabled = true": "enabled = false"}


def transfer_spec(tmp_path, extra: str = MUP):
    path = write_spec(tmp_path, replace=GRID)
    path.write_text(path.read_text() + extra)
    return load_spec(path)


def test_plan_runs_every_width_and_lr_under_each_parametrization(tmp_path):
    spec = transfer_spec(tmp_path)
    runs = plan_sweep(spec)
    assert len(runs) == 4 * 3 * 2                 # widths x lrs x parametrizations
    assert len({r.run_id for r in runs}) == len(runs)
    for r in runs:
        assert r.run_id.startswith(f"{r.parametrization}-") and r.size.startswith(f"{r.parametrization}-")
        assert r.overrides["model.parametrization"] == r.parametrization
        assert r.overrides["model.mup_base_dim"] == 32
        assert r.overrides["model.mup_base_head_dim"] == 16           # the family's head_dim: heads are added
    store = ResultsStore(tmp_path / "results.sqlite")
    store.register(runs[0].store_row())
    assert store.get(runs[0].run_id)["parametrization"] == runs[0].parametrization
    assert store.get(runs[0].run_id)["dim"] == runs[0].dim


@pytest.mark.parametrize("extra, match", [("\n[mup]\nbase_dim = 0\n", r"\[mup\] base_dim = 0"),
                                          ("\n[mup]\nbase_dim = 32\nparametrizations = ['mup', 'xp']\n",
                                           r"\[mup\] parametrizations"),
                                          ("\n[mup]\nbase_dim = 32\nbase = 1\n", r"\[mup\] has unknown keys")])
def test_bad_mup_tables_are_named(tmp_path, extra, match):
    with pytest.raises(SweepSpecError, match=match):
        transfer_spec(tmp_path, extra)


def test_a_store_from_before_the_mup_columns_gains_them(tmp_path):
    import sqlite3
    db = sqlite3.connect(tmp_path / "old.sqlite")
    db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT)")
    db.commit()
    db.close()
    store = ResultsStore(tmp_path / "old.sqlite")
    spec = transfer_spec(tmp_path)
    store.register(plan_sweep(spec)[0].store_row())
    assert store.rows()[0]["parametrization"] == "sp"


def row(par, dim, lr, loss, status="done"):
    return {"parametrization": par, "dim": dim, "lr": lr, "kind": "scratch", "D": 1.0, "status": status,
            "final_val_loss": loss, "final_loss": loss}


def test_lr_transfer_marks_the_best_lr_and_its_shift_in_grid_steps(tmp_path):
    rows = [row("sp", 64, lr, loss) for lr, loss in ((1e-3, 3.0), (2e-3, 2.5), (4e-3, 2.7))]
    rows += [row("sp", 256, lr, loss) for lr, loss in ((5e-4, 2.4), (1e-3, 2.2), (2e-3, 2.3))]
    rows += [row("sp", 256, 4e-3, None, "failed")]
    rows += [row("mup", 64, lr, loss) for lr, loss in ((1e-3, 3.0), (2e-3, 2.5), (4e-3, 2.7))]
    rows += [row("mup", 256, lr, loss) for lr, loss in ((1e-3, 2.4), (2e-3, 2.1), (4e-3, 2.2))]
    t = lr_transfer(rows)
    assert t["sp"][64]["best_lr"] == 2e-3 and t["sp"][256]["best_lr"] == 1e-3
    assert t["sp"][256]["shift"] == -1 and t["sp"][256]["failed_lrs"] == [4e-3]
    assert t["mup"][256]["best_lr"] == 2e-3 and t["mup"][256]["shift"] == 0
    from scaling.mup_plots import plot_lr_transfer
    out = plot_lr_transfer(t, tmp_path / "lr_transfer.png")
    assert out.stat().st_size > 10_000
