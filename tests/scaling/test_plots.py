"""What the sweep plots show: which IsoFLOP minima are extrapolated, which budgets were dropped and
the note naming them, readable log ticks, the fit's progress lines. Decisions and artists, not pixels."""
import io

import numpy as np
import pytest

from scaling.fit_progress import FitProgress
from scaling.isoflop import fit_isoflop
from scaling.plot_data import (DROPPED, EXTRAPOLATED, INSIDE, fmt_count, fmt_flops, frontier_notes,
                               isoflop_curves, isoflop_notes)

SIZES = np.array([1e8, 2e8, 4e8, 8e8])


def three_budgets():
    """1e19: minimum at 3e8, inside; 2e19: minimum at 1e7, 10x below the smallest size sampled;
    4e19: loss falls with N everywhere but bends down (concave): no minimum, dropped."""
    x = np.log(SIZES)
    losses = {1e19: 2.5 + 0.05 * (x - np.log(3e8)) ** 2,
              2e19: 2.4 + 0.05 * (x - np.log(1e7)) ** 2,
              4e19: 2.6 - 0.01 * (x - np.log(1e8)) ** 2}
    points = [{"N": n, "D": c / (6 * n), "loss": float(l), "budget": c}
              for c, ls in losses.items() for n, l in zip(SIZES, ls)]
    iso = fit_isoflop([p["budget"] for p in points], [p["N"] for p in points], [p["loss"] for p in points])
    return points, iso.to_dict()


def test_each_budget_is_inside_extrapolated_or_dropped_and_the_note_says_which():
    points, iso = three_budgets()
    curves = isoflop_curves(points, iso)
    assert [(c.budget, c.status) for c in curves] == [(1e19, INSIDE), (2e19, EXTRAPOLATED), (4e19, DROPPED)]
    assert curves[0].n_opt == pytest.approx(3e8, rel=1e-6)
    assert curves[1].reason == "N* = 10M is 10x below the smallest model sampled (100M)"
    assert curves[2].reason == "loss vs log N not convex: no minimum" and curves[2].n_opt is None
    notes = isoflop_notes(curves, iso)
    assert notes == ["C = 4e19: not fitted (loss vs log N not convex: no minimum)",
                     "C = 2e19: N* = 10M is 10x below the smallest model sampled (100M); not used for N*(C)",
                     "N*(C), D*(C) power laws not fitted: 1 budget(s) with a minimum inside the sampled "
                     "sizes, 2 needed"]
    assert any("hollow" in n for n in frontier_notes(curves, iso, None))


def test_a_fit_json_without_the_dropped_list_still_names_the_dropped_budget():
    points, iso = three_budgets()
    del iso["dropped"]                              # fit.json written before the list existed
    dropped = [c for c in isoflop_curves(points, iso) if c.status == DROPPED]
    assert [(c.budget, c.reason) for c in dropped] == [(4e19, "loss vs log N is not convex (curvature -0.01)")]


def test_number_labels_read_like_the_papers():
    assert [fmt_count(v) for v in (36960, 1.2e6, 7e10, 1.4e12, 512)] == ["37k", "1.2M", "70B", "1.4T", "512"]
    assert [fmt_flops(v) for v in (6e9, 1.2e10, 1e21, 9.999e9)] == ["6e9", "1.2e10", "1e21", "1e10"]


def test_figures_mark_extrapolation_carry_the_note_and_ticks_do_not_overlap(tmp_path, monkeypatch):
    from scaling import plots
    from scaling.parametric import ChinchillaFit
    figs = {}
    real_save = plots._save

    def keep(fig, path, notes=None):
        figs[path.name] = fig
        return real_save(fig, path, notes)

    monkeypatch.setattr(plots, "_save", keep)
    points, iso = three_budgets()
    chin = ChinchillaFit(E=1.7, A=400.0, B=1100.0, alpha=0.34, beta=0.3, objective=0, n_points=12,
                         n_inits=1).to_dict()
    made = plots.plot_all(points, {"isoflop": iso, "chinchilla": chin}, tmp_path)
    assert sorted(p.name for p in made) == ["frontier.png", "isoflop.png", "loss_vs_n_d.png", "residuals.png"]
    ax = figs["isoflop.png"].axes[0]
    stars = [ln for ln in ax.lines if ln.get_marker() == "*"]
    hollow = [ln for ln in stars if ln.get_markerfacecolor() == "white" and len(ln.get_xdata()) == 1]
    assert [ln.get_xdata()[0] for ln in hollow] == [pytest.approx(1e7, rel=1e-6)]    # the extrapolated one
    assert any(ln.get_linestyle() == "--" and min(ln.get_xdata()) == pytest.approx(1e7, rel=1e-6) for ln in ax.lines)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "C = 4e19 FLOPs: not fitted" in labels and "C = 2e19 FLOPs: minimum extrapolated" in labels
    note = "\n".join(t.get_text() for t in figs["isoflop.png"].texts)
    assert "C = 4e19: not fitted" in note and "10x below the smallest model sampled" in note
    # frontier.png: its C axis spans less than a decade (the case whose 10^x minor labels overlapped)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    fig = figs["frontier.png"]
    canvas = FigureCanvasAgg(fig)              # the figure was closed after saving: a canvas to measure on
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            ticks = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
            assert 2 <= len(ticks) <= 9, [t.get_text() for t in ticks]
            boxes = [t.get_window_extent(renderer) for t in ticks]
            assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), \
                [t.get_text() for t in ticks]
    assert any(t.get_text() == "2e19" for t in fig.axes[0].get_xticklabels())
    resid = figs["residuals.png"].axes[0]
    assert resid.get_legend() is not None and resid.get_xlabel() and resid.get_ylabel()


def test_fit_progress_plain_lines_off_a_terminal_and_a_bar_on_one():
    out, now = io.StringIO(), [0.0]
    prog = FitProgress(stream=out, tty=False, clock=lambda: now[0])
    prog("bootstrap", 0, 8)                     # the fit calls it with 0 before the first resample
    for i in range(1, 9):
        now[0] += 2.0
        prog("bootstrap", i, 8)
    prog("starts", 0, 64)                      # the default 64 starts take seconds: not reported
    prog("starts", 64, 64)
    assert out.getvalue().splitlines() == [
        "fit: bootstrap resamples: 8 to run",
        "fit: bootstrap resamples: 25% (2 of 8), 4 s, about 12 s left",
        "fit: bootstrap resamples: 50% (4 of 8), 8 s, about 8 s left",
        "fit: bootstrap resamples: 75% (6 of 8), 12 s, about 4 s left",
        "fit: bootstrap resamples: 8 done in 16.0 s"]
    out = io.StringIO()
    prog = FitProgress(stream=out, tty=True, clock=lambda: 0.0)
    for i in range(0, 201):
        prog("bootstrap", i, 200)
    text = out.getvalue()
    assert "\rbootstrap resamples:   0%|" in text and "0/200" in text          # tqdm's bar (redrawn each 0.1 s)
    assert text.endswith("\rfit: bootstrap resamples: 200 done in 0.0 s\n")   # the bar cleared, then the time
