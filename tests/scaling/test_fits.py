import csv
import time
from pathlib import Path

import numpy as np
import pytest

from scaling.isoflop import fit_budget, fit_isoflop, fit_power_law
from scaling.kaplan import fit_kaplan
from scaling.parametric import ChinchillaFit, fit_chinchilla, make_grid

TRUE = dict(E=1.7, A=400.0, B=1100.0, alpha=0.34, beta=0.30)
CHINCHILLA = Path(__file__).resolve().parent / "refdata" / "chinchilla_data.csv"   # source: refdata/README.md


def synthetic(n_points=200, noise=0.003, seed=0):
    rng = np.random.default_rng(seed)
    n = np.exp(rng.uniform(np.log(1e7), np.log(1e10), n_points))
    d = np.exp(rng.uniform(np.log(1e9), np.log(1e12), n_points))
    law = ChinchillaFit(**TRUE, objective=0, n_points=0, n_inits=0)
    loss = law.predict(n, d) * np.exp(rng.normal(0, noise, n_points))
    return n, d, loss


def test_parametric_recovers_known_law_from_noisy_points():
    n, d, loss = synthetic()
    fit = fit_chinchilla(n, d, loss, top_k=30)
    assert fit.E == pytest.approx(TRUE["E"], rel=0.03)
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.03)
    assert fit.beta == pytest.approx(TRUE["beta"], abs=0.03)
    # A and B are badly conditioned alone; the terms they make are what the data pins down
    assert fit.A / 1e8 ** fit.alpha == pytest.approx(TRUE["A"] / 1e8 ** TRUE["alpha"], rel=0.1)
    assert fit.B / 1e10 ** fit.beta == pytest.approx(TRUE["B"] / 1e10 ** TRUE["beta"], rel=0.1)


def test_bootstrap_intervals_cover_the_truth():
    n, d, loss = synthetic(n_points=120, seed=1)
    fit = fit_chinchilla(n, d, loss, top_k=10, bootstrap=20, seed=3)
    assert fit.n_bootstrap == 20
    for name in ("E", "alpha", "beta"):
        lo, hi = fit.intervals[name]
        assert lo < hi
        assert lo - 0.02 * abs(TRUE[name]) <= TRUE[name] <= hi + 0.02 * abs(TRUE[name]), name


def test_compute_optimal_minimises_the_law_along_the_isoflop():
    fit = ChinchillaFit(**TRUE, objective=0, n_points=0, n_inits=0)
    c = 1e21
    n_opt, d_opt = fit.compute_optimal(c)
    assert 6 * n_opt * d_opt == pytest.approx(c)
    ns = n_opt * np.exp(np.linspace(-1, 1, 201))
    losses = fit.predict(ns, c / (6 * ns))
    assert ns[np.argmin(losses)] == pytest.approx(n_opt, rel=0.02)


def test_top_k_matches_every_start_on_a_small_grid():
    n, d, loss = synthetic(n_points=60, seed=2)
    grid = dict(alpha=[0.5, 1.0], beta=[0.5, 1.0], e=[-1.0, 1.0], a=[5.0], b=[0.0, 10.0])
    every = fit_chinchilla(n, d, loss, grid=grid)
    best = fit_chinchilla(n, d, loss, grid=grid, top_k=4)
    assert every.n_inits == 16 and best.n_inits == 4
    assert best.objective == pytest.approx(every.objective, rel=1e-6)
    assert best.alpha == pytest.approx(every.alpha, abs=1e-4)


def test_bad_points_are_rejected_with_the_field_named():
    with pytest.raises(ValueError, match="D must be finite"):
        fit_chinchilla([1e6] * 6, [1e9] * 5 + [0], [3.0] * 6)
    with pytest.raises(ValueError, match="only 3 points"):
        fit_chinchilla([1, 2, 3], [1, 2, 3], [1, 2, 3])


def test_fit_speed_hoffmann_grid_300_points():
    assert len(make_grid()) == 4500
    n, d, loss = synthetic(n_points=300, seed=4)
    t0 = time.perf_counter()
    fit = fit_chinchilla(n, d, loss)   # scores all 4500 starts, L-BFGS from the best (default top_k)
    elapsed = time.perf_counter() - t0
    print(f"parametric fit, 4500 initialisations x 300 points: {elapsed:.1f} s")
    assert elapsed < 60
    assert fit.alpha == pytest.approx(TRUE["alpha"], abs=0.03)


def test_refit_published_chinchilla_points():
    rows = list(csv.DictReader(CHINCHILLA.open()))
    n, d, loss = (np.array([float(r[k]) for r in rows]) for k in
                  ("model_size_N", "training_tokens_D", "loss"))
    fit = fit_chinchilla(n, d, loss)
    print(f"refit on {len(rows)} points: E={fit.E:.3f} A={fit.A:.1f} B={fit.B:.1f} "
          f"alpha={fit.alpha:.4f} beta={fit.beta:.4f}  "
          "(Epoch AI: 1.82, 482, 2085, 0.3478, 0.3658; Hoffmann: 1.69, 406.4, 410.7, 0.34, 0.28)")
    # the data pin down the exponents and the floor; check the fit explains them
    assert 1.5 < fit.E < 2.1 and 0.25 < fit.alpha < 0.45 and 0.25 < fit.beta < 0.5
    resid = np.log(fit.predict(n, d)) - np.log(loss)
    assert np.median(np.abs(resid)) < 0.02


def test_isoflop_minima_recovered_from_synthetic_parabolas():
    rng = np.random.default_rng(0)
    budgets = [1e18, 1e19, 1e20, 1e21]
    c_all, n_all, l_all = [], [], []
    for c in budgets:
        n_star = 0.09 * c ** 0.52
        ns = n_star * np.exp(np.linspace(-1.5, 1.2, 9))
        loss = 2.0 + 0.05 * np.log(1e22 / c) + 0.08 * (np.log(ns) - np.log(n_star)) ** 2
        loss += rng.normal(0, 1e-4, len(ns))
        c_all += [c] * len(ns); n_all += list(ns); l_all += list(loss)
    fit = fit_isoflop(c_all, n_all, l_all)
    for c, m in zip(budgets, fit.minima):
        assert m.budget == c and m.interior
        assert m.n_opt == pytest.approx(0.09 * c ** 0.52, rel=0.02)
        assert m.d_opt == pytest.approx(c / (6 * m.n_opt))
    assert fit.n_opt.exponent == pytest.approx(0.52, abs=0.005)
    assert fit.d_opt.exponent == pytest.approx(0.48, abs=0.005)
    assert fit.n_opt.coef == pytest.approx(0.09, rel=0.1)


def test_isoflop_agrees_with_the_parametric_optimum():
    law = ChinchillaFit(**TRUE, objective=0, n_points=0, n_inits=0)
    budgets = np.logspace(19, 22, 4)
    c_all, n_all, l_all = [], [], []
    for c in budgets:
        n_star, _ = law.compute_optimal(c)
        ns = n_star * np.exp(np.linspace(-0.7, 0.7, 9))
        c_all += [c] * 9; n_all += list(ns); l_all += list(law.predict(ns, c / (6 * ns)))
    fit = fit_isoflop(c_all, n_all, l_all)
    s = TRUE["alpha"] + TRUE["beta"]
    assert fit.n_opt.exponent == pytest.approx(TRUE["beta"] / s, abs=0.01)
    assert fit.d_opt.exponent == pytest.approx(TRUE["alpha"] / s, abs=0.01)


def test_isoflop_skips_a_concave_budget_and_keeps_the_rest():
    n = [1e8, 1e9, 1e10] * 3
    loss = [3.0, 2.0, 3.0, 2.5, 2.0, 2.5, 2.0, 3.0, 2.0]      # the last budget bends the wrong way
    fit = fit_isoflop([1e19] * 3 + [1e20] * 3 + [1e21] * 3, n, loss)
    assert [m.budget for m in fit.minima] == [1e19, 1e20]
    assert len(fit.skipped) == 1 and "1e+21" in fit.skipped[0] and "not convex" in fit.skipped[0]
    assert fit.dropped == [{"budget": 1e21, "reason": "loss vs log N not convex: no minimum"}]   # for the plots
    assert fit.n_opt is not None


def test_isoflop_rejects_concave_or_short_budgets():
    with pytest.raises(ValueError, match="not convex"):
        fit_budget(1e20, [1e8, 1e9, 1e10], [2.0, 3.0, 2.0])
    with pytest.raises(ValueError, match=">= 3 distinct N"):
        fit_budget(1e20, [1e8, 1e9], [3.0, 2.0])


def test_power_law_and_kaplan_laws_recover_exponents():
    x = np.logspace(6, 9, 7)
    pl = fit_power_law(x, 3.0 * x ** -0.2)
    assert pl.exponent == pytest.approx(-0.2) and pl.coef == pytest.approx(3.0) and pl.r2 > 0.999
    # L(N) = (8.8e13 / N)^0.076 on the best loss per N; worse (under-trained) points must be ignored
    n = np.repeat(x, 2)
    loss = (8.8e13 / n) ** 0.076
    loss[1::2] += 0.3
    law = fit_kaplan("N", n, loss)
    assert law.alpha == pytest.approx(0.076, rel=1e-6)
    assert law.x_c == pytest.approx(8.8e13, rel=1e-4)
    assert law.n_points == len(x)


def test_isoflop_power_laws_use_only_minima_inside_the_sampled_sizes():
    n = np.array([1e8, 1e9, 1e10])
    x = np.log(n)
    budgets, ns, losses = [], [], []
    for c, centre in ((1e19, 1e9), (1e20, 3e9), (1e21, 1e12)):       # the last minimum lies outside
        budgets += [c] * 3; ns += list(n); losses += list(2 + 0.01 * (x - np.log(centre)) ** 2)
    fit = fit_isoflop(budgets, ns, losses)
    assert [m.interior for m in fit.minima] == [True, True, False]
    assert fit.n_opt.exponent == pytest.approx(np.log10(3), abs=1e-6)    # through the 2 inside only
    budgets, ns, losses = budgets[3:], ns[3:], losses[3:]
    losses[:3] = list(2 + 0.01 * (x - np.log(1e7)) ** 2)                    # now only one inside
    fit = fit_isoflop(budgets, ns, losses)
    assert fit.n_opt is None and "the power laws need 2" in fit.skipped[-1]
