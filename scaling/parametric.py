"""The Chinchilla parametric law L(N, D) = E + A / N^alpha + B / D^beta, fitted as Hoffmann et al.
(2022, App. D.2) do: Huber loss (delta = 1e-3) on the residuals of log-loss, with the law written as
log-sum-exp of (a - alpha log N, b - beta log D, e), where A = e^a, B = e^b, E = e^e, minimised by
L-BFGS from a grid of initialisations and the best optimum kept.

scipy has L-BFGS but no Huber-on-log-sum-exp objective, so the objective and its analytic gradient
are written here; the grid itself is scored in one vectorised numpy pass first.
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

try:
    from threadpoolctl import threadpool_limits
except ImportError:          # optional: without it the fit is correct, only slower on busy machines
    threadpool_limits = None

PARAM_NAMES = ("E", "A", "B", "alpha", "beta")

# Hoffmann et al.'s grid: alpha, beta in {0, .5, ..., 2}, e in {-1, -.5, ..., 1}, a, b in {0, 5, ..., 25}
# -> 5 * 5 * 5 * 6 * 6 = 4500 initialisations.
HOFFMANN_GRID = {
    "alpha": np.arange(0.0, 2.01, 0.5),
    "beta": np.arange(0.0, 2.01, 0.5),
    "e": np.arange(-1.0, 1.01, 0.5),
    "a": np.arange(0.0, 25.01, 5.0),
    "b": np.arange(0.0, 25.01, 5.0),
}


@dataclass
class ChinchillaFit:
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float            # summed Huber loss at the optimum
    n_points: int
    n_inits: int
    intervals: dict = field(default_factory=dict)   # name -> [lo, hi] from the bootstrap
    n_bootstrap: int = 0

    def predict(self, n, d):
        n, d = np.asarray(n, float), np.asarray(d, float)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, c, flops_per_param_token: float = 6.0):
        """N*(C), D*(C) minimising L(N, D) subject to C = k N D (k = 6 by default).

        Setting dL/dN = 0 along D = C / (k N) gives N* = G (C/k)^(beta/(alpha+beta)) with
        G = (alpha A / (beta B))^(1/(alpha+beta)), and D* = (C/k) / N*.
        """
        c = np.asarray(c, float)
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / s)
        n_opt = g * (c / flops_per_param_token) ** (self.beta / s)
        d_opt = (c / flops_per_param_token) / n_opt
        return n_opt, d_opt

    def to_dict(self) -> dict:
        out = asdict(self)
        with np.errstate(divide="ignore"):
            out["a"], out["b"], out["e"] = (float(np.log(v)) for v in (self.A, self.B, self.E))
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "ChinchillaFit":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def _theta_to_fit(theta, objective, n_points, n_inits) -> ChinchillaFit:
    a, b, e, alpha, beta = (float(x) for x in theta)
    with np.errstate(over="ignore"):
        E, A, B = (float(np.exp(v)) for v in (e, a, b))
    return ChinchillaFit(E=E, A=A, B=B, alpha=alpha, beta=beta,
                         objective=float(objective), n_points=n_points, n_inits=n_inits)


def huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def objective_and_grad(theta, log_n, log_d, log_loss, delta):
    """Summed Huber loss of log-sum-exp(a - alpha lnN, b - beta lnD, e) - ln L, and its gradient
    with respect to theta = (a, b, e, alpha, beta)."""
    a, b, e, alpha, beta = theta
    r = np.stack([a - alpha * log_n, b - beta * log_d, np.full_like(log_n, e)])
    lse = logsumexp(r, axis=0)
    resid = lse - log_loss
    w = np.exp(r - lse)                          # softmax weights = d lse / d r_k
    dh = np.clip(resid, -delta, delta)           # Huber derivative
    g1, g2, g3 = w[0] * dh, w[1] * dh, w[2] * dh
    grad = np.array([g1.sum(), g2.sum(), g3.sum(), -(g1 * log_n).sum(), -(g2 * log_d).sum()])
    return float(huber(resid, delta).sum()), grad


def grid_objectives(thetas, log_n, log_d, log_loss, delta):
    """Objective of every initialisation in one pass: thetas is [M, 5] -> [M]."""
    a, b, e, alpha, beta = (thetas[:, i:i + 1] for i in range(5))
    r1 = a - alpha * log_n[None, :]
    r2 = b - beta * log_d[None, :]
    r3 = np.broadcast_to(e, r1.shape)
    lse = np.logaddexp(np.logaddexp(r1, r2), r3)
    return huber(lse - log_loss[None, :], delta).sum(axis=1)


def make_grid(grid: dict | None = None) -> np.ndarray:
    g = HOFFMANN_GRID if grid is None else grid
    missing = {"a", "b", "e", "alpha", "beta"} - set(g)
    if missing:
        raise ValueError(f"initialisation grid lacks {sorted(missing)}; it needs a, b, e, alpha, beta")
    return np.array(list(itertools.product(g["a"], g["b"], g["e"], g["alpha"], g["beta"])), float)


def _check_points(n, d, loss):
    n, d, loss = (np.asarray(x, float).ravel() for x in (n, d, loss))
    if not (len(n) == len(d) == len(loss)):
        raise ValueError(f"N, D and loss differ in length: {len(n)}, {len(d)}, {len(loss)}")
    if len(n) < 5:
        raise ValueError(f"the parametric law has 5 parameters; got only {len(n)} points")
    for name, x in (("N", n), ("D", d), ("loss", loss)):
        if not np.all(np.isfinite(x)) or np.any(x <= 0):
            raise ValueError(f"{name} must be finite and > 0 for every point (log is taken)")
    return n, d, loss


def _lbfgs(theta0, args, maxiter):
    # far-off starts overflow exp() on the way; those steps are rejected by the line search, and
    # the warnings (slow to emit under pytest's recorder, and harmless) are silenced
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        res = minimize(objective_and_grad, theta0, args=args, jac=True, method="L-BFGS-B",
                       options={"maxiter": maxiter, "ftol": 1e-14, "gtol": 1e-10})
    return res.x, (res.fun if np.isfinite(res.fun) else np.inf)


def fit_chinchilla(n, d, loss, *, delta: float = 1e-3, grid: dict | None = None,
                   top_k: int | None = 64, maxiter: int = 1000, bootstrap: int = 0,
                   confidence: float = 0.95, seed: int = 0, progress=None) -> ChinchillaFit:
    """Fit E, A, B, alpha, beta. Every grid point is scored; L-BFGS then runs from the top_k best
    (default 64). top_k=None runs it from every grid point, as Hoffmann et al. do: on the 245
    Chinchilla points all 4500 starts reached the same optimum as the best 20 (122 s vs 0.5 s
    here), so the default trades nothing measurable for speed. bootstrap=R adds percentile intervals from R resamples of the points.
    progress(stage, done, total), if given, is called with done = 0 before and after each L-BFGS start
    ("starts") and each bootstrap resample ("bootstrap"): those loops are what takes minutes."""
    n, d, loss = _check_points(n, d, loss)
    # L-BFGS works on 5-vectors, where multi-threaded BLAS only spins: one thread is 7x faster here
    with threadpool_limits(1) if threadpool_limits else nullcontext():
        return _fit(n, d, loss, delta, grid, top_k, maxiter, bootstrap, confidence, seed,
                    progress or (lambda stage, done, total: None))


def _fit(n, d, loss, delta, grid, top_k, maxiter, bootstrap, confidence, seed, progress) -> ChinchillaFit:
    args = (np.log(n), np.log(d), np.log(loss), delta)
    thetas = make_grid(grid)
    with np.errstate(over="ignore", invalid="ignore"):
        scores = grid_objectives(thetas, *args)
    order = np.argsort(scores)
    starts = thetas[order if top_k is None else order[:top_k]]
    best_x, best_f = None, np.inf
    progress("starts", 0, len(starts))
    for i, t0 in enumerate(starts):
        x, f = _lbfgs(t0, args, maxiter)
        if f < best_f:
            best_x, best_f = x, f
        progress("starts", i + 1, len(starts))
    fit = _theta_to_fit(best_x, best_f, len(n), len(starts))
    if bootstrap:
        fit.intervals = _bootstrap(n, d, loss, best_x, thetas, delta, maxiter, bootstrap,
                                   confidence, seed, progress)
        fit.n_bootstrap = bootstrap
    return fit


def _bootstrap(n, d, loss, theta_hat, thetas, delta, maxiter, reps, confidence, seed, progress):
    """Percentile intervals: refit on resampled points, starting L-BFGS from the full-data optimum
    and the resample's 4 best grid points (a full grid per resample would multiply the cost)."""
    rng = np.random.default_rng(seed)
    samples = []
    progress("bootstrap", 0, reps)
    for rep in range(reps):
        idx = rng.integers(0, len(n), len(n))
        args = (np.log(n[idx]), np.log(d[idx]), np.log(loss[idx]), delta)
        with np.errstate(over="ignore", invalid="ignore"):
            starts = [theta_hat, *thetas[np.argsort(grid_objectives(thetas, *args))[:4]]]
        best_x, best_f = None, np.inf
        for t0 in starts:
            x, f = _lbfgs(t0, args, maxiter)
            if f < best_f:
                best_x, best_f = x, f
        a, b, e, alpha, beta = best_x
        with np.errstate(over="ignore"):       # a degenerate resample may run off to A = inf
            samples.append([np.exp(e), np.exp(a), np.exp(b), alpha, beta])
        progress("bootstrap", rep + 1, reps)
    s = np.array(samples)
    lo, hi = 50 * (1 - confidence), 50 * (1 + confidence)      # inf samples sort last: fine for percentiles
    return {name: [float(np.percentile(s[:, i], lo)), float(np.percentile(s[:, i], hi))]
            for i, name in enumerate(PARAM_NAMES)}
