"""PNG plots of a sweep's points and fits (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .isoflop import PowerLaw  # noqa: E402
from .parametric import ChinchillaFit  # noqa: E402


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_isoflop(points, iso: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4.5))
    cmap = plt.get_cmap("viridis")
    minima = iso.get("minima", [])
    for i, m in enumerate(minima):
        col = cmap(i / max(1, len(minima) - 1))
        pts = sorted((p["N"], p["loss"]) for p in points if p.get("budget") == m["budget"])
        ns = np.array([p[0] for p in pts])
        ax.plot(ns, [p[1] for p in pts], "o", color=col, label=f"C={m['budget']:.2g}")
        x = np.linspace(np.log(ns.min()), np.log(ns.max()), 100)
        ax.plot(np.exp(x), np.polyval(m["coeffs"], x), "-", color=col, alpha=0.7)
        ax.plot(m["n_opt"], m["loss_opt"], "*", ms=14, color=col, mec="k")
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss", title="IsoFLOP curves and minima")
    ax.legend(fontsize=8)
    return _save(fig, out)


def plot_frontier(iso: dict | None, chin: dict | None, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    minima = (iso or {}).get("minima", [])
    cs = np.array([m["budget"] for m in minima]) if minima else None
    if chin:
        lo, hi = (cs.min() / 3, cs.max() * 3) if cs is not None else (1e9, 1e13)
        grid = np.logspace(np.log10(lo), np.log10(hi), 50)
        n_opt, d_opt = ChinchillaFit.from_dict(chin).compute_optimal(grid)
        axes[0].plot(grid, n_opt, "-", label="parametric fit N*(C)")
        axes[1].plot(grid, d_opt, "-", label="parametric fit D*(C)")
    if minima:
        for ax, key, law in ((axes[0], "n_opt", iso.get("n_opt")), (axes[1], "d_opt", iso.get("d_opt"))):
            ax.plot(cs, [m[key] for m in minima], "o", label="IsoFLOP minima")
            if law:
                pl = PowerLaw(**law)
                ax.plot(cs, pl(cs), "--", label=f"{pl.coef:.3g} C^{pl.exponent:.3f}")
    for ax, name in zip(axes, ("N*", "D*")):
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=name,
               title=f"compute-optimal {name}")
        ax.legend(fontsize=8)
    return _save(fig, out)


def plot_loss_vs_n_d(points, chin: dict | None, out: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    fit = ChinchillaFit.from_dict(chin) if chin else None
    n = np.array([p["N"] for p in points]); d = np.array([p["D"] for p in points])
    loss = np.array([p["loss"] for p in points])
    for ax, x, other, xl, ol in ((axes[0], n, d, "N", "D"), (axes[1], d, n, "D", "N")):
        sc = ax.scatter(x, loss, c=np.log10(other), cmap="plasma")
        fig.colorbar(sc, ax=ax, label=f"log10 {ol}")
        if fit is not None:
            xs = np.logspace(np.log10(x.min()), np.log10(x.max()), 60)
            for o in np.unique(other)[:: max(1, len(np.unique(other)) // 5)]:
                y = fit.predict(xs, o) if xl == "N" else fit.predict(o, xs)
                ax.plot(xs, y, "-", lw=0.8, color=plt.get_cmap("plasma")(
                    (np.log10(o) - np.log10(other.min())) / max(1e-9, np.ptp(np.log10(other)))))
        ax.set(xscale="log", xlabel=xl, ylabel="loss", title=f"loss vs {xl} (lines: fit at fixed {ol})")
    return _save(fig, out)


def plot_residuals(points, chin: dict, out: Path) -> Path:
    fit = ChinchillaFit.from_dict(chin)
    n = np.array([p["N"] for p in points]); d = np.array([p["D"] for p in points])
    loss = np.array([p["loss"] for p in points])
    pred = fit.predict(n, d)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(6 * n * d, np.log(loss) - np.log(pred), c=np.log10(n), cmap="viridis")
    ax.axhline(0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="C = 6ND", ylabel="log L - log L_fit", title="residuals of the parametric fit")
    return _save(fig, out)


def plot_all(points, fits: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chin, iso = fits.get("chinchilla"), fits.get("isoflop")
    made = [plot_loss_vs_n_d(points, chin, out_dir / "loss_vs_n_d.png")]
    if iso and iso.get("minima"):
        made.append(plot_isoflop(points, iso, out_dir / "isoflop.png"))
    if iso or chin:
        made.append(plot_frontier(iso, chin, out_dir / "frontier.png"))
    if chin:
        made.append(plot_residuals(points, chin, out_dir / "residuals.png"))
    return made
