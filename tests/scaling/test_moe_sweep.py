"""Dense vs MoE at equal active compute ([moe] in a sweep spec), on the fake trainer: N is the
active parameter count for the design (D = C / 6N) and for the fits, one fit per variant."""
from __future__ import annotations

import json

import pytest

from core.model_config import ModelConfig
from scaling.cli import main
from scaling.plan import plan_sweep
from scaling.spec import SweepSpecError, load_spec
from scaling.store import ResultsStore

from .fake_trainer import LAW
from .helpers import write_spec

MOE = "\n[moe]\nexperts = 4\ntop_k = 2\n"
NO_COOLDOWN = {"enabled = true": "enabled = false"}


def moe_spec(tmp_path, extra: str = MOE):
    path = write_spec(tmp_path, replace=NO_COOLDOWN)
    path.write_text(path.read_text() + extra)
    return path


def test_plan_sizes_moe_runs_by_active_parameters(tmp_path):
    runs = plan_sweep(load_spec(moe_spec(tmp_path)))
    assert len(runs) == 4 * 3 * 2                                    # dims x budgets x {dense, moe}
    by = {(r.variant, r.dim, r.budget): r for r in runs}
    for (variant, dim, budget), r in by.items():
        assert r.size.startswith(f"{variant}-") and r.C == 6 * r.n_params * r.D
        model = ModelConfig(vocab_size=320, dim=dim, n_layers=1, n_heads=dim // 16, n_kv_heads=dim // 16,
                            max_seq_len=512, moe_experts=r.overrides["model.moe_experts"],
                            moe_hidden=r.overrides.get("model.moe_hidden", 0))
        assert r.n_params == model.num_params(active=True) and r.n_params_all == model.num_params()
        if variant == "dense":
            assert r.overrides["model.moe_experts"] == 0 and r.n_params_all == r.n_params
            continue
        # expert_width 1/top_k: two experts of half the dense width are the dense MLP's matmuls,
        # so a token's parameters differ from the dense model's by the router alone (4 x dim)
        assert r.overrides["model.moe_hidden"] * 2 == model.hidden
        dense = by[("dense", dim, budget)]
        assert r.n_params - dense.n_params == 4 * dim
        assert r.n_params_all - r.n_params == 2 * 3 * dim * r.overrides["model.moe_hidden"]   # 2 idle experts
        assert abs(r.D - dense.D) <= 8 * 64                                                  # one step apart
    store = ResultsStore(tmp_path / "results.sqlite")
    store.register(runs[-1].store_row())
    assert store.get(runs[-1].run_id)["variant"] == "moe"
    assert store.get(runs[-1].run_id)["n_params_all"] == runs[-1].n_params_all


def test_moe_sweep_fits_each_variant_in_active_parameters(tmp_path, capsys):
    # 3 sizes x 2 budgets x 2 variants (12 fake runs: each a process start-up)
    spec_path = write_spec(tmp_path, replace={**NO_COOLDOWN, "dims = [32, 48, 64, 96]": "dims = [32, 48, 64]",
                                              "budgets = [6e9, 1.2e10, 2.4e10]": "budgets = [6e9, 2.4e10]"})
    spec_path.write_text(spec_path.read_text() + MOE)
    assert main(["run", str(spec_path), "--jobs", "2"]) == 0
    rows = ResultsStore(load_spec(spec_path).results_path).rows()
    moe = [r for r in rows if r["variant"] == "moe"]
    # what the trainer's summary said: n_params_active as N, every parameter as n_params_all
    assert moe and all(r["n_params_all"] > r["n_params"] for r in moe)
    assert main(["fit", str(spec_path), "--top-k", "2"]) == 0
    fits = json.loads((tmp_path / "sweep" / "fit.json").read_text())["variants"]
    assert set(fits) == {"dense", "moe"}
    for fit in fits.values():    # the fake's loss follows its law in active N: each fit recovers it
        assert fit["n_points"] == 6 and fit["chinchilla"]["alpha"] == pytest.approx(LAW["alpha"], abs=0.15)
    out = capsys.readouterr().out
    assert "dense: L(N, D)" in out and "moe: L(N, D)" in out
    assert (tmp_path / "sweep" / "points-moe.csv").is_file()


@pytest.mark.parametrize("extra, match", [
    ("\n[moe]\ntop_k = 2\n", r"\[moe\] needs `experts`"),
    ("\n[moe]\nexperts = 4\ntop_k = 5\n", r"\[moe\] experts = 4, top_k = 5"),
    ("\n[moe]\nexperts = 4\nvariants = ['moe', 'sparse']\n", r"\[moe\] variants"),
    ("\n[moe]\nexperts = 4\nevery = 2\n", r"\[moe\] size d32l1: model.moe_every: must be between 1 and model.n_layers = 1"),
])
def test_bad_moe_tables_are_named(tmp_path, extra, match):
    with pytest.raises(SweepSpecError, match=match):
        plan_sweep(load_spec(moe_spec(tmp_path, extra)))
