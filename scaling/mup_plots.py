"""muP plots (matplotlib, Agg): the coordinate check (`meshformer mup check`) and the LR-transfer
curves of a sweep with a [mup] table (`meshformer sweep plot`)."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NAMES = {"sp": "standard (sp)", "mup": "muP"}


def log_slope(widths: list[float], sizes: list[float]) -> float:
    """Least-squares slope of log(size) against log(width): 0 = flat, 1 = grows like the width."""
    xs = [math.log(w) for w in widths]
    ys = [math.log(s) for s in sizes]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def plot_coord_check(result: dict, path: Path, max_panels: int = 4) -> Path:
    """One row per parametrization, one panel per step shown (the first, the last and evenly spaced
    ones between), one line per layer: mean |activation| against width, both on log axes. The panel
    titles give the logits' log-slope over width."""
    records, widths, steps = result["records"], result["widths"], result["steps"]
    shown = sorted({round(i * steps / (max_panels - 1)) for i in range(max_panels)}) if steps + 1 > max_panels \
        else list(range(steps + 1))
    pars = list(records)
    fig, axes = plt.subplots(len(pars), len(shown), figsize=(3.2 * len(shown), 3.0 * len(pars)),
                             sharey="row", squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, par in enumerate(pars):
        layers = list(records[par])
        for col, t in enumerate(shown):
            ax = axes[row][col]
            for i, layer in enumerate(layers):
                ys = [records[par][layer][str(w)][t] for w in widths]
                ax.plot(widths, ys, marker="o", ms=3, color=cmap(i / max(1, len(layers) - 1)), label=layer)
            slope = log_slope(widths, [records[par]["logits"][str(w)][t] for w in widths])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{NAMES.get(par, par)}, after {t} step{'s' * (t != 1)}\nlogits slope {slope:+.2f}", fontsize=9)
            ax.set_xticks(widths, [str(w) for w in widths])
            ax.minorticks_off()
            if row == len(pars) - 1:
                ax.set_xlabel("width (model.dim)")
            if col == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"coordinate check: lr {result['lr']:g}, {result['n_layers']} layers, {result['n_heads']} heads, "
                 f"muP base width {result['base_dim']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_lr_transfer(transfer: dict, path: Path) -> Path:
    """Final loss against LR, one line per width, one panel per parametrization; each width's best
    LR is a star, failed (diverged) LRs are crosses at the top of the panel."""
    pars = sorted(transfer, key=lambda p: (p != "sp", p))          # sp on the left, as in the coordinate check
    fig, axes = plt.subplots(1, len(pars), figsize=(5.0 * len(pars), 4.0), sharey=True, squeeze=False)
    cmap = plt.get_cmap("plasma")
    top = max(v for widths in transfer.values() for w in widths.values() for v in w["losses"])
    for ax, par in zip(axes[0], pars):
        widths = transfer[par]
        for i, (dim, w) in enumerate(sorted(widths.items())):
            color = cmap(0.85 * i / max(1, len(widths) - 1))
            ax.plot(w["lrs"], w["losses"], marker="o", ms=4, color=color,
                    label=f"width {dim}: best lr {w['best_lr']:g} ({w['shift']:+d} steps)")
            ax.plot([w["best_lr"]], [min(w["losses"])], marker="*", ms=14, color=color, mec="black")
            if w["failed_lrs"]:
                ax.plot(w["failed_lrs"], [top] * len(w["failed_lrs"]), "x", ms=8, color=color)
        ax.set_xscale("log", base=2)
        lrs = sorted({x for w in widths.values() for x in w["lrs"] + w["failed_lrs"]})
        ax.set_xticks(lrs, [f"{x:g}" for x in lrs], rotation=30, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("peak learning rate (optim.lr)")
        ax.set_title(f"{NAMES.get(par, par)}: best LR per width", fontsize=10)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("final validation loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
