"""From stored runs to fit inputs and fit results: choose the points (branch or from-scratch runs,
the best LR per (N, D)), fit the three kinds of law, and compare branches with scratch runs."""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from .isoflop import fit_isoflop
from .kaplan import fit_kaplan
from .parametric import fit_chinchilla


def run_loss(row: dict, which: str = "val") -> float | None:
    v = row.get("final_val_loss") if which == "val" else row.get("final_loss")
    if v is None or (isinstance(v, float) and math.isnan(v)):
        v = row.get("final_loss")            # no validation split: fall back to the train loss
    return None if v is None or math.isnan(v) else float(v)


def select_points(rows: list[dict], kind: str = "auto", loss: str = "val",
                  param_count: str = "total") -> list[dict]:
    """One point per (size, D): among the finished runs of `kind` ("branch", "scratch", or "auto" =
    branches when there are any), the LR with the lowest loss averaged over seeds. N is the
    stored n_params: active parameters for a [moe] sweep's runs."""
    done = [r for r in rows if r["status"] == "done" and r["kind"] in ("branch", "scratch")]
    if kind == "auto":
        kind = "branch" if any(r["kind"] == "branch" for r in done) else "scratch"
    groups = defaultdict(lambda: defaultdict(list))          # (size, D) -> lr -> [rows]
    for r in done:
        if r["kind"] == kind and run_loss(r, loss) is not None:
            groups[(r["size"], r["D"])][r["lr"]].append(r)
    points = []
    for (size, d), by_lr in sorted(groups.items()):
        lr, rs = min(by_lr.items(), key=lambda kv: np.mean([run_loss(r, loss) for r in kv[1]]))
        n = rs[0]["n_params"] if param_count == "total" else rs[0]["n_params_non_embedding"]
        points.append({"size": size, "variant": rs[0].get("variant") or "", "N": n, "D": d, "C": 6.0 * n * d,
                       "budget": rs[0]["budget"],
                       "loss": float(np.mean([run_loss(r, loss) for r in rs])), "lr": lr,
                       "kind": kind, "seeds": len(rs), "lrs_tried": len(by_lr)})
    return points


def fit_all(points: list[dict], *, bootstrap: int = 0, top_k: int | None = 64,
            budgets: list[float] | None = None, progress=None) -> dict:
    """Every law the points allow: Chinchilla (>= 5 points), IsoFLOP (points carry a budget and
    each budget has >= 3 sizes), Kaplan L(N), L(D), L(C). Skipped fits say why. progress: see
    parametric.fit_chinchilla."""
    n = np.array([p["N"] for p in points], float)
    d = np.array([p["D"] for p in points], float)
    loss = np.array([p["loss"] for p in points], float)
    out: dict = {"n_points": len(points)}
    try:
        fit = fit_chinchilla(n, d, loss, bootstrap=bootstrap, top_k=top_k, progress=progress)
        out["chinchilla"] = fit.to_dict()
        cs = budgets or sorted({p["budget"] for p in points if p.get("budget")}) or \
            list(np.logspace(np.log10(6 * n.min() * d.min()), np.log10(6 * n.max() * d.max()), 5))
        n_opt, d_opt = fit.compute_optimal(np.array(cs, float))
        out["compute_optimal"] = [{"C": float(c), "N": float(a), "D": float(b)} for c, a, b in zip(cs, n_opt, d_opt)]
    except ValueError as e:
        out["chinchilla_skipped"] = str(e)
    with_budget = [p for p in points if p.get("budget")]
    if with_budget:
        try:
            out["isoflop"] = fit_isoflop([p["budget"] for p in with_budget], [p["N"] for p in with_budget],
                                         [p["loss"] for p in with_budget]).to_dict()
        except ValueError as e:
            out["isoflop_skipped"] = str(e)
    out["kaplan"] = {}
    for var, x in (("N", n), ("D", d), ("C", n * d * 6)):
        try:
            out["kaplan"][var] = fit_kaplan(var, x, loss).to_dict()
        except ValueError as e:
            out["kaplan"][var] = {"skipped": str(e)}
    return out


def cooldown_comparison(rows: list[dict], loss: str = "val") -> list[dict]:
    """Branch vs the same (size, lr, seed, D) trained from scratch with the same WSD schedule."""
    scratch = {(r["size"], r["lr"], r["seed"], r["D"]): r for r in rows
               if r["kind"] == "scratch" and r["status"] == "done"}
    out = []
    for r in rows:
        s = scratch.get((r["size"], r["lr"], r["seed"], r["D"]))
        if r["kind"] == "branch" and r["status"] == "done" and s is not None:
            lb, ls = run_loss(r, loss), run_loss(s, loss)
            out.append({"size": r["size"], "lr": r["lr"], "seed": r["seed"], "D": r["D"],
                        "branch_loss": lb, "scratch_loss": ls, "gap": lb - ls})
    return out


def lr_transfer(rows: list[dict], loss: str = "val") -> dict:
    """Loss against LR per (parametrization, width) and where its minimum lies, for an LR-transfer
    sweep ([mup] in the spec): {par: {dim: {"lrs", "losses", "best_lr", "shift"}}}. `shift` counts
    grid steps (positions in the sorted LRs tried) from the best LR at the smallest (base) width:
    muP works when it stays within +-1 while sp's moves. Runs that failed (diverged) or have no loss
    are listed under "failed_lrs". Uses each width's largest D, losses averaged over seeds."""
    out: dict = {}
    by = defaultdict(lambda: defaultdict(list))             # (par, dim) -> lr -> [rows]
    for r in rows:
        if r.get("dim") is None or r["kind"] not in ("scratch", "branch"):
            continue
        by[(r.get("parametrization") or "sp", int(r["dim"]))][r["lr"]].append(r)
    for (par, dim), by_lr in sorted(by.items()):
        d_max = max(r["D"] for rs in by_lr.values() for r in rs)
        curve, failed = {}, []
        for lr, rs in by_lr.items():
            losses = [run_loss(r, loss) for r in rs if r["D"] == d_max and r["status"] == "done"]
            losses = [v for v in losses if v is not None]
            if losses:
                curve[lr] = float(np.mean(losses))
            elif any(r["status"] == "failed" for r in rs):
                failed.append(lr)
        if curve:
            lrs = sorted(curve)
            out.setdefault(par, {})[dim] = {"lrs": lrs, "losses": [curve[x] for x in lrs],
                                            "best_lr": min(lrs, key=curve.get), "failed_lrs": sorted(failed)}
    for par, widths in out.items():
        grid = sorted({x for w in widths.values() for x in w["lrs"] + w["failed_lrs"]})
        base = widths[min(widths)]["best_lr"]
        for w in widths.values():
            w["shift"] = grid.index(w["best_lr"]) - grid.index(base)
    return out
