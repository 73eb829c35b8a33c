"""What the plots show, decided without matplotlib (so tests check the decisions, not pixels):
per IsoFLOP budget whether its minimum was measured inside the sampled model sizes, extrapolated
outside them, or not fitted at all (and why); the notes printed on the figures; number labels in
the style of Hoffmann et al.'s figures (N and D as 400M, 1.4T; FLOPs as 6e20)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

INSIDE, EXTRAPOLATED, DROPPED = "inside", "extrapolated", "dropped"


def fmt_count(v: float) -> str:
    """Parameters and tokens: 37k, 1.2M, 70B, 1.4T (3 significant digits at most)."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3g}{suffix}"
    return f"{v:.3g}"


def fmt_flops(v: float) -> str:
    """FLOPs: 6e9, 1.2e10, 1e21 (no '+', no zero padding)."""
    if v <= 0:
        return f"{v:g}"
    exp = math.floor(math.log10(v) + 1e-9)
    mant = f"{v / 10 ** exp:.2g}"
    if mant == "10":                      # 9.99e9 rounds up to the next decade
        mant, exp = "1", exp + 1
    return f"{mant}e{exp}"


@dataclass
class BudgetCurve:
    """One IsoFLOP budget: its points, and what became of its parabola."""
    budget: float
    n: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    status: str = DROPPED                 # INSIDE, EXTRAPOLATED or DROPPED
    n_opt: float | None = None
    loss_opt: float | None = None
    coeffs: list | None = None            # parabola in ln N (highest power first)
    reason: str = ""                      # DROPPED: why; EXTRAPOLATED: how far outside

    @property
    def sampled(self) -> tuple[float, float]:
        return min(self.n), max(self.n)

    @property
    def label(self) -> str:
        head = f"C = {fmt_flops(self.budget)} FLOPs"
        if self.status == EXTRAPOLATED:
            return f"{head}: minimum extrapolated"
        if self.status == DROPPED:
            return f"{head}: not fitted"
        return head


def extrapolation(n_opt: float, n_min: float, n_max: float) -> str:
    """How far a parabola's minimum lies outside the sampled sizes, in words."""
    if n_opt < n_min:
        return f"N* = {fmt_count(n_opt)} is {n_min / n_opt:.3g}x below the smallest model sampled ({fmt_count(n_min)})"
    return f"N* = {fmt_count(n_opt)} is {n_opt / n_max:.3g}x above the largest model sampled ({fmt_count(n_max)})"


def _same(a: float, b: float) -> bool:
    return math.isclose(float(a), float(b), rel_tol=1e-9)


def isoflop_curves(points: list[dict], iso: dict | None) -> list[BudgetCurve]:
    """Every budget the points carry, in increasing C. A budget with no minimum in the fit (an
    older fit.json has no `dropped` list) is DROPPED with the fit's reason, never left out."""
    iso = iso or {}
    curves: list[BudgetCurve] = []
    for p in sorted((p for p in points if p.get("budget")), key=lambda p: (p["budget"], p["N"])):
        if not curves or not _same(curves[-1].budget, p["budget"]):
            curves.append(BudgetCurve(budget=float(p["budget"])))
        curves[-1].n.append(float(p["N"]))
        curves[-1].loss.append(float(p["loss"]))
    for c in curves:
        m = next((m for m in iso.get("minima", []) if _same(m["budget"], c.budget)), None)
        if m is None:
            d = next((d for d in iso.get("dropped", []) if _same(d["budget"], c.budget)), None)
            old = next((s for s in iso.get("skipped", []) if s.startswith(f"budget {c.budget:.3g}:")), "")
            c.reason = d["reason"] if d else (old.split(": ", 1)[-1].split(";")[0] or "no minimum fitted")
            continue
        c.n_opt, c.loss_opt, c.coeffs = m["n_opt"], m["loss_opt"], m["coeffs"]
        lo, hi = c.sampled
        # the fit's own verdict decides (the same test as isoflop.fit_budget: in log N, ends included)
        c.status = INSIDE if m.get("interior", lo <= c.n_opt <= hi) else EXTRAPOLATED
        if c.status == EXTRAPOLATED:
            c.reason = extrapolation(c.n_opt, lo, hi)
    return curves


def isoflop_notes(curves: list[BudgetCurve], iso: dict | None) -> list[str]:
    """The lines of the note on isoflop.png: budgets left out of the fit, extrapolated minima, and
    the N*(C) law when it could not be fitted."""
    notes = [f"C = {fmt_flops(c.budget)}: not fitted ({c.reason})" for c in curves if c.status == DROPPED]
    notes += [f"C = {fmt_flops(c.budget)}: {c.reason}; not used for N*(C)" for c in curves
              if c.status == EXTRAPOLATED]
    notes += law_notes(iso)
    return notes


def law_notes(iso: dict | None) -> list[str]:
    """Why the N*(C), D*(C) power laws are missing, when they are."""
    if not iso or iso.get("n_opt"):
        return []
    inside = sum(1 for m in iso.get("minima", []) if m.get("interior"))
    return [f"N*(C), D*(C) power laws not fitted: {inside} budget(s) with a minimum inside the sampled sizes, "
            "2 needed"]


def frontier_notes(curves: list[BudgetCurve], iso: dict | None, chin: dict | None) -> list[str]:
    notes = [f"C = {fmt_flops(c.budget)} not shown: no IsoFLOP minimum ({c.reason})" for c in curves
             if c.status == DROPPED]
    if any(c.status == EXTRAPOLATED for c in curves):
        notes.append("hollow: IsoFLOP minimum extrapolated outside the sampled model sizes (not used for the law)")
    notes += law_notes(iso)
    if chin is None:
        notes.append("no parametric fit (it needs >= 5 points)")
    elif not curves:
        notes.append("the points carry no compute budgets: no IsoFLOP minima, only the parametric fit's optimum")
    return notes


def compute_range(points: list[dict], curves: list[BudgetCurve]) -> tuple[float, float]:
    """The C axis of frontier.png: every run's 6ND and every budget, a little wider."""
    cs = [6.0 * p["N"] * p["D"] for p in points] + [c.budget for c in curves]
    if not cs:
        return 1e18, 1e22
    return min(cs) / 1.5, max(cs) * 1.5
