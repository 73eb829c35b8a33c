"""IsoFLOP analysis (Hoffmann et al. 2022, approach 2): for each compute budget C, fit a parabola to
loss against log N, take its minimum N*(C), then fit power laws N*(C) = k_N C^a and D*(C) = k_D C^b
by least squares in log-log space (numpy.polyfit does both fits)."""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class BudgetMinimum:
    budget: float
    n_opt: float              # argmin of the parabola in log N
    d_opt: float              # C / (6 N*)
    loss_opt: float           # parabola value at its minimum
    coeffs: list              # parabola in ln N: c2 x^2 + c1 x + c0
    n_points: int
    interior: bool            # the minimum lies inside the sampled N range


@dataclass
class PowerLaw:
    """y = coef * x^exponent, fitted as ln y = ln coef + exponent ln x."""
    coef: float
    exponent: float
    r2: float

    def __call__(self, x):
        return self.coef * np.asarray(x, float) ** self.exponent


@dataclass
class IsoFlopFit:
    minima: list = field(default_factory=list)
    skipped: list = field(default_factory=list)     # budgets without a usable parabola, and why
    # the same budgets as {"budget": C, "reason": short why}: the plots list them on the figure
    dropped: list = field(default_factory=list)
    n_opt: PowerLaw | None = None
    d_opt: PowerLaw | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def fit_power_law(x, y) -> PowerLaw:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or np.any(x <= 0) or np.any(y <= 0):
        raise ValueError(f"a power law needs >= 2 points with x, y > 0; got {len(x)}")
    lx, ly = np.log(x), np.log(y)
    slope, intercept = np.polyfit(lx, ly, 1)
    pred = intercept + slope * lx
    ss_tot = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(((ly - pred) ** 2).sum()) / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(coef=math.exp(intercept), exponent=float(slope), r2=r2)


class BudgetDropped(ValueError):
    """A budget whose points give no minimum; .reason is the short why (for a figure's note)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def fit_budget(budget, n, loss, flops_per_param_token: float = 6.0) -> BudgetMinimum:
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(np.unique(n)) < 3:
        raise BudgetDropped(f"budget {budget:.3g}: a parabola needs >= 3 distinct N, got {len(np.unique(n))}",
                            f"{len(np.unique(n))} model size(s); a parabola needs 3")
    x = np.log(n)
    c2, c1, c0 = np.polyfit(x, loss, 2)
    if c2 <= 0:
        raise BudgetDropped(f"budget {budget:.3g}: loss vs log N is not convex (curvature {c2:.3g}); "
                            "widen the range of model sizes around the optimum",
                            "loss vs log N not convex: no minimum")
    x_opt = -c1 / (2 * c2)
    n_opt = math.exp(x_opt)
    return BudgetMinimum(budget=float(budget), n_opt=n_opt,
                         d_opt=float(budget) / (flops_per_param_token * n_opt),
                         loss_opt=float(c0 - c1 * c1 / (4 * c2)), coeffs=[float(c2), float(c1), float(c0)],
                         n_points=len(n), interior=bool(x.min() <= x_opt <= x.max()))


def fit_isoflop(budget, n, loss, flops_per_param_token: float = 6.0) -> IsoFlopFit:
    """budget, n, loss: one entry per run; runs are grouped by their (exact) budget value. A budget
    whose points make no convex parabola is skipped (listed in .skipped), not fatal."""
    groups = defaultdict(list)
    for c, ni, li in zip(budget, n, loss):
        groups[float(c)].append((float(ni), float(li)))
    out = IsoFlopFit()
    for c in sorted(groups):
        pts = np.array(groups[c])
        try:
            out.minima.append(fit_budget(c, pts[:, 0], pts[:, 1], flops_per_param_token))
        except BudgetDropped as e:
            out.skipped.append(str(e))
            out.dropped.append({"budget": c, "reason": e.reason})
    # a minimum outside the sampled sizes is an extrapolation of the parabola: not used for the laws
    inside = [m for m in out.minima if m.interior]
    if len(inside) >= 2:
        cs = [m.budget for m in inside]
        out.n_opt = fit_power_law(cs, [m.n_opt for m in inside])
        out.d_opt = fit_power_law(cs, [m.d_opt for m in inside])
    elif out.minima:
        out.skipped.append(f"N*(C), D*(C): {len(inside)} budget(s) with the minimum inside the sampled "
                           "sizes; the power laws need 2")
    return out
