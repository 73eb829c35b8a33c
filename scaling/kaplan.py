"""Kaplan et al. (2020)-style single-variable laws L(X) = (X_c / X)^alpha_X for X in N, D, C, each
fitted on the points where the other variable does not limit the loss: L(N) on the best loss per N
(over all D), L(D) on the best loss per D, L(C) on the best loss per compute budget (the frontier).
In log space the law is a straight line, so the fit is the same least squares as fit_power_law."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass

import numpy as np

from .isoflop import fit_power_law


@dataclass
class KaplanLaw:
    variable: str        # "N", "D" or "C"
    x_c: float           # L = (x_c / x)^alpha
    alpha: float
    r2: float
    n_points: int

    def __call__(self, x):
        return (self.x_c / np.asarray(x, float)) ** self.alpha

    def to_dict(self):
        return asdict(self)


def envelope(x, loss):
    """Lowest loss for each distinct x, sorted by x."""
    best = defaultdict(lambda: np.inf)
    for xi, li in zip(x, loss):
        best[float(xi)] = min(best[float(xi)], float(li))
    xs = sorted(best)
    return np.array(xs), np.array([best[k] for k in xs])


def fit_kaplan(variable: str, x, loss) -> KaplanLaw:
    xs, ls = envelope(x, loss)
    pl = fit_power_law(xs, ls)               # L = coef * x^exponent, exponent = -alpha
    alpha = -pl.exponent
    if alpha == 0:
        raise ValueError(f"L({variable}) is flat; no power law to fit")
    x_c = pl.coef ** (1.0 / alpha)
    return KaplanLaw(variable=variable, x_c=float(x_c), alpha=float(alpha), r2=pl.r2, n_points=len(xs))
