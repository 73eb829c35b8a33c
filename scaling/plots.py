"""PNG plots of a sweep's points and fits (matplotlib, Agg backend: no display needed), drawn to be
read like Hoffmann et al.'s figures: N = parameters, D = tokens, C = 6ND FLOPs, loss. What is
extrapolated or left out is decided in plot_data.py and marked on the figure: hollow markers and
dashed lines for IsoFLOP minima outside the sampled sizes, a note listing budgets not fitted."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.colors import LogNorm  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from .isoflop import PowerLaw  # noqa: E402
from .parametric import ChinchillaFit  # noqa: E402
from .plot_data import (DROPPED, EXTRAPOLATED, INSIDE, compute_range, fmt_count, fmt_flops,  # noqa: E402
                        frontier_notes, isoflop_curves, isoflop_notes)

LAW = "L(N, D) = E + A/N^α + B/D^β"
# tick label sets tried in turn on a log axis: the sparsest that puts >= 3 labels in view wins
_SUBS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(range(1, 10)))


def _log_axis(ax, which: str, fmt) -> None:
    """Log axis with labels that do not overlap: decades when the data spans several, else 1-2-5
    steps; labels written by `fmt` (37k / 6e9 rather than matplotlib's 10^x and 6x10^9 minor labels)."""
    axis = ax.xaxis if which == "x" else ax.yaxis
    lo, hi = ax.get_xlim() if which == "x" else ax.get_ylim()
    decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
    subs = next((s for s in _SUBS if sum(lo <= m * 10 ** e <= hi for e in decades for m in s) >= 3), _SUBS[-1])
    axis.set_major_locator(ticker.LogLocator(base=10, subs=subs, numticks=8))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt(v)))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs=tuple(range(2, 10)), numticks=12))
    axis.set_minor_formatter(ticker.NullFormatter())


def _note(fig, lines: list[str]) -> None:
    """A boxed note under the axes, one line per item (the figure is made taller to hold it)."""
    if not lines:
        return
    w, h = fig.get_size_inches()
    extra = 0.19 * len(lines) + 0.2
    bottom, top = fig.subplotpars.bottom * h, (1 - fig.subplotpars.top) * h     # inches tight_layout left
    fig.set_size_inches(w, h + extra)
    fig.subplots_adjust(bottom=(bottom + extra) / (h + extra), top=1 - top / (h + extra))
    fig.text(0.01, 0.01, "\n".join("• " + line for line in lines), fontsize=8, va="bottom", ha="left",
             bbox=dict(boxstyle="round", fc="#fff8e0", ec="#c9a227"))


def _save(fig, path: Path, notes: list[str] | None = None) -> Path:
    fig.tight_layout()
    _note(fig, notes or [])
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_isoflop(points, iso: dict | None, out: Path) -> Path:
    curves = isoflop_curves(points, iso)
    fig, ax = plt.subplots(figsize=(9.5, 5))
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(curves):
        col = cmap(0.9 * i / max(1, len(curves) - 1))
        ns = np.array(c.n)
        if c.status == DROPPED:
            ax.plot(ns, c.loss, "x:", color=col, ms=7, label=c.label)
            continue
        ax.plot(ns, c.loss, "o", color=col, label=c.label)
        lo, hi = np.log(c.sampled)
        x = np.linspace(lo, hi, 100)
        ax.plot(np.exp(x), np.polyval(c.coeffs, x), "-", color=col, alpha=0.8)
        if c.status == EXTRAPOLATED:         # the parabola beyond the data, out to its minimum
            x_opt = math.log(c.n_opt)
            ext = np.linspace(x_opt, lo, 60) if x_opt < lo else np.linspace(hi, x_opt, 60)
            ax.plot(np.exp(ext), np.polyval(c.coeffs, ext), "--", color=col, alpha=0.8)
            ax.plot(c.n_opt, c.loss_opt, "*", ms=15, mfc="white", mec=col, mew=1.5)
        else:
            ax.plot(c.n_opt, c.loss_opt, "*", ms=15, color=col, mec="k")
    handles, _ = ax.get_legend_handles_labels()
    if any(c.status == INSIDE for c in curves):
        handles.append(Line2D([], [], ls="-", marker="*", ms=12, color="grey", mec="k",
                              label="parabola in log N;\nits minimum, inside the sampled N"))
    if any(c.status == EXTRAPOLATED for c in curves):
        handles.append(Line2D([], [], ls="--", marker="*", ms=12, color="grey", mfc="white",
                              label="extrapolated: minimum\noutside the sampled N"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))   # beside the curves
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss",
           title="IsoFLOP curves: loss vs model size at fixed compute C = 6ND")
    _log_axis(ax, "x", fmt_count)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, out, isoflop_notes(curves, iso))


def plot_frontier(points, iso: dict | None, chin: dict | None, out: Path) -> Path:
    """Compute-optimal N*(C) and D*(C): IsoFLOP minima (hollow where extrapolated), their power
    laws, the parametric fit's optimum, and every run's (C, N) / (C, D) for scale."""
    curves = isoflop_curves(points, iso)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    c_lo, c_hi = compute_range(points, curves)
    grid = np.logspace(math.log10(c_lo), math.log10(c_hi), 50)
    fit = ChinchillaFit.from_dict(chin) if chin else None
    opt = fit.compute_optimal(grid) if fit else None
    runs_c = np.array([6.0 * p["N"] * p["D"] for p in points])
    for k, (ax, key, name, fmt) in enumerate(((axes[0], "N", "parameters N*", fmt_count),
                                              (axes[1], "D", "tokens D*", fmt_count))):
        if len(points):
            ax.plot(runs_c, [p[key] for p in points], ".", color="0.75", ms=5, label="runs (all points)")
        if opt is not None:
            exp = fit.beta / (fit.alpha + fit.beta) if key == "N" else fit.alpha / (fit.alpha + fit.beta)
            ax.plot(grid, opt[k], "-", color="C3", label=f"parametric fit {LAW}: {key}* ∝ C^{exp:.2f}")
        for status, style in ((INSIDE, dict(color="C0")), (EXTRAPOLATED, dict(mfc="white", mec="C0", mew=1.5))):
            sel = [c for c in curves if c.status == status]
            if sel:
                y = [c.n_opt if key == "N" else c.budget / (6.0 * c.n_opt) for c in sel]
                ax.plot([c.budget for c in sel], y, "o", ms=8, ls="none", **style,
                        label="IsoFLOP minima" if status == INSIDE else "IsoFLOP minima, extrapolated")
        law = (iso or {}).get("n_opt" if key == "N" else "d_opt")
        if law:
            pl = PowerLaw(**law)
            ax.plot(grid, pl(grid), "--", color="C0", label=f"IsoFLOP fit: {key}* = {pl.coef:.3g} C^{pl.exponent:.2f}")
        ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=name,
               title=f"compute-optimal {'model size N*' if key == 'N' else 'tokens D*'} vs compute")
        ax.set_xlim(c_lo, c_hi)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.45)     # headroom: the legend sits above the data
        _log_axis(ax, "x", fmt_flops)
        _log_axis(ax, "y", fmt)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7.5, loc="upper left")
    return _save(fig, out, frontier_notes(curves, iso, chin))


def plot_loss_vs_n_d(points, chin: dict | None, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.4))
    fit = ChinchillaFit.from_dict(chin) if chin else None
    n = np.array([p["N"] for p in points]); d = np.array([p["D"] for p in points])
    loss = np.array([p["loss"] for p in points])
    for ax, x, other, xl, ol in ((axes[0], n, d, "parameters N", "tokens D"),
                                 (axes[1], d, n, "tokens D", "parameters N")):
        norm = LogNorm(other.min(), other.max() if other.max() > other.min() else other.min() * 1.01)
        ax.scatter(x, loss, c=other, norm=norm, cmap="plasma", s=22)
        ax.plot([], [], "o", color="0.5", ms=5, label=f"runs (colour: {ol})")     # a neutral legend entry
        if fit is not None:
            xs = np.logspace(np.log10(x.min()), np.log10(x.max()), 60)
            # a few fixed values of the other variable, spread over its range in log scale
            for o in np.unique(np.geomspace(other.min(), other.max(), 4 if other.max() > other.min() else 1)):
                y = fit.predict(xs, o) if xl.endswith("N") else fit.predict(o, xs)
                ax.plot(xs, y, "-", lw=1.2, color=plt.get_cmap("plasma")(norm(o)),
                        label=f"fit at {ol.split()[1]} = {fmt_count(o)}")
        _log_axis(fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="plasma"), ax=ax, label=ol).ax, "y", fmt_count)
        ax.set(xscale="log", xlabel=xl, ylabel="loss",
               title=f"loss vs {xl}" + (f"\nlines: the parametric fit at fixed {ol.split()[1]}" if fit else ""))
        _log_axis(ax, "x", fmt_count)
        ax.grid(alpha=0.3, which="major")
        ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)   # under it: off the data
    return _save(fig, out)


def plot_residuals(points, chin: dict, out: Path) -> Path:
    fit = ChinchillaFit.from_dict(chin)
    n = np.array([p["N"] for p in points]); d = np.array([p["D"] for p in points])
    loss = np.array([p["loss"] for p in points])
    resid = np.log(loss) - np.log(fit.predict(n, d))
    rms = float(np.sqrt(np.mean(resid ** 2)))
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    norm = LogNorm(n.min(), n.max() if n.max() > n.min() else n.min() * 1.01)
    ax.axhspan(-rms, rms, color="0.9", label=f"± RMS residual ({rms:.3g}, about {100 * rms:.2g}% of the loss)")
    ax.axhline(0, color="k", lw=0.8, label="0: the fit's prediction")
    ax.scatter(6 * n * d, resid, c=n, norm=norm, cmap="viridis", s=22)
    ax.plot([], [], "o", color="0.5", ms=5, label="runs (colour: parameters N)")     # a neutral legend entry
    _log_axis(fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=ax, label="parameters N").ax,
              "y", fmt_count)
    ax.set(xscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="ln L − ln L_fit  (≈ relative error)",
           title=f"Residuals of the parametric fit {LAW}")
    _log_axis(ax, "x", fmt_flops)
    ax.grid(alpha=0.3, which="major")
    ax.legend(fontsize=8, loc="best")
    return _save(fig, out)


def plot_all(points, fits: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chin, iso = fits.get("chinchilla"), fits.get("isoflop")
    made = [plot_loss_vs_n_d(points, chin, out_dir / "loss_vs_n_d.png")]
    if iso and any(p.get("budget") for p in points):     # also when every budget was dropped: says so
        made.append(plot_isoflop(points, iso, out_dir / "isoflop.png"))
    if iso or chin:
        made.append(plot_frontier(points, iso, chin, out_dir / "frontier.png"))
    if chin:
        made.append(plot_residuals(points, chin, out_dir / "residuals.png"))
    return made
