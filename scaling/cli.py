"""`meshformer sweep plan|run|status|collect|fit|plot` (also `python -m scaling ...`, except
`run --slurm`, whose job script comes from launch/: `meshformer sweep` hands its `launcher` in)."""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from core.cli_args import ArgParser, at_least
from core.errors import MeshformerError, UsageError, report_errors

from .analysis import cooldown_comparison, fit_all, lr_transfer, select_points
from .fit_progress import FitProgress
from .plan import accounting, plan_sweep
from .runner import effective_status, execute_run, load_plan, run_local, select_runs, write_plan
from .slurm_arrays import ArrayLauncher, read_run_list, submit_arrays
from .spec import SweepSpecError, load_spec
from .store import ResultsStore


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))


def cmd_plan(a) -> int:
    spec = load_spec(a.spec)
    runs = plan_sweep(spec)
    if a.json:
        print(json.dumps([r.store_row() for r in runs], indent=1))
        return 0
    print(f"{'run':40s} {'kind':7s} {'N':>8s} {'N_noemb':>8s} {'D':>9s} {'C':>9s} {'steps':>6s} {'lr':>8s}  parent")
    for r in runs:
        print(f"{r.run_id:40s} {r.kind:7s} {r.n_params:8d} {r.n_params_non_embedding:8d} {r.D:9.3g} "
              f"{r.C:9.3g} {r.steps_planned:6d} {r.lr:8.3g}  {r.parent or ''}")
    acc = accounting(runs)
    print(f"\n{acc['runs']} runs, {acc['points']} (N, D) points, compute {acc['compute_spent']:.3g} FLOPs (6ND)")
    if spec.moe_variants:
        held = ", ".join(sorted({f"{r.size} {r.n_params_all}" for r in runs if r.variant == "moe"}))
        print(f"[moe]: N is the ACTIVE parameter count (a token's top-k experts); all parameters held: {held}")
    if acc["branches"]:
        print(f"cooldown branches: {acc['branch_compute']:.3g} FLOPs for {acc['branches']} points that "
              f"would cost {acc['branch_points_from_scratch']:.3g} from scratch "
              f"({100 * acc['saved_fraction']:.0f}% saved)")
    return 0


def cmd_run(a, launcher: ArrayLauncher | None) -> int:
    at_least("--jobs", a.jobs, 1, "runs at a time")
    spec = load_spec(a.spec)
    if a.slurm and launcher is None:
        raise RuntimeError("--slurm needs the launcher layer: run `meshformer sweep run --slurm` "
                           "(python -m trainer sweep ...), not python -m scaling")
    if not a.slurm:
        counts = run_local(spec, jobs=a.jobs, retry_failed=a.retry_failed)
        print("status: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0 if counts.get("failed", 0) == 0 else 1
    runs = plan_sweep(spec)
    store = write_plan(spec, runs)
    todo = select_runs(spec, runs, store, a.retry_failed)
    print(f"{len(todo)} runs to submit, {len(runs) - len(todo)} skipped (done, running or failed)")
    if todo:
        submit_arrays(spec, todo, a.jobs, launcher, wait=a.wait, extra_sbatch=a.sbatch_arg or [], profile=a.profile)
    if a.wait:
        counts = store.counts()
        print("status: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return 0 if counts.get("failed", 0) == 0 else 1
    return 0


def cmd_status(a) -> int:
    spec = load_spec(a.spec)
    store = ResultsStore(spec.results_path)
    rows = store.rows()
    if not rows:
        print(f"no runs recorded in {spec.results_path}: `sweep plan` / `sweep run` first")
        return 1
    counts: dict = {}
    for r in rows:
        st = effective_status(r)
        counts[st] = counts.get(st, 0) + 1
        if a.verbose or st in ("failed", "lost", "running", "preempted"):
            err = (r["error"] or "").strip().splitlines()
            print(f"{r['run_id']:40s} {st:8s} loss {_fmt(r['final_loss'])} val {_fmt(r['final_val_loss'])} "
                  f"{r['slurm_job'] or ''} {err[0][:80] if err else ''}")
    print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


def cmd_exec(a, launcher: ArrayLauncher | None) -> int:
    """One run, by id or as line --run-index of a stage's run list (an array task). Returns the
    trainer's exit code, so that the job script sees the requeue code of a signal-triggered save."""
    spec = load_spec(a.spec)
    if (a.run_id is None) == (a.run_list is None) or (a.run_list is None) != (a.run_index is None):
        raise UsageError("sweep exec: give --run-id ID, or --run-list FILE with --run-index I")
    try:
        run_id = a.run_id or read_run_list(a.run_list, a.run_index)
    except ValueError as e:
        raise UsageError(f"sweep exec: {e}") from None
    if run_id not in load_plan(spec):
        raise UsageError(f"--run-id: run id {run_id!r} is not in {spec.out_dir / 'plan.json'}")
    rank = launcher.rank() if launcher else 0
    # --run.overwrite false is what a requeued job script appends (launch/sbatch.py): resume
    return execute_run(spec, run_id, record=rank == 0, resume=a.overwrite == "false")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["N", "D", "loss"])
        w.writeheader()
        w.writerows(rows)


def _collect(spec, kind, loss):
    store = ResultsStore(spec.results_path)
    rows = store.rows()
    store.export_csv(spec.out_dir / "results.csv", rows)
    points = select_points(rows, kind, loss, spec.param_count)
    _write_csv(spec.out_dir / "points.csv", points)
    for v in _fit_groups(spec):        # a [moe] sweep: each variant's points apart, for its own fit
        _write_csv(spec.out_dir / f"points-{v}.csv", [p for p in points if p["variant"] == v])
    return rows, points


def _fit_groups(spec) -> tuple:
    """The variants fitted apart ([moe] with both: dense and MoE are different model families, each
    with its own law in active parameters); () = one fit of all points."""
    return spec.moe_variants if len(spec.moe_variants) > 1 else ()


def _write_transfer(spec, rows, loss) -> dict:
    """An LR-transfer sweep ([mup]): loss against LR per (parametrization, width) -> lr_transfer.json."""
    transfer = lr_transfer(rows, loss)
    (spec.out_dir / "lr_transfer.json").write_text(json.dumps(transfer, indent=1) + "\n")
    return transfer


def _print_transfer(transfer: dict) -> None:
    for par, widths in transfer.items():
        best = ", ".join(f"width {d}: {w['best_lr']:g} ({w['shift']:+d} grid steps)" for d, w in sorted(widths.items()))
        print(f"best LR under {par}: {best}")


def cmd_collect(a) -> int:
    spec = load_spec(a.spec)
    rows, points = _collect(spec, a.kind, a.loss)
    print(f"{len(rows)} runs -> {spec.out_dir / 'results.csv'}; {len(points)} points (best LR per (N, D)) "
          f"-> {spec.out_dir / 'points.csv'}")
    acc = accounting(plan_sweep(spec))
    if acc["branches"]:
        print(f"cooldown branches: {acc['branch_compute']:.3g} FLOPs instead of "
              f"{acc['branch_points_from_scratch']:.3g} from scratch: {100 * acc['saved_fraction']:.1f}% saved")
    if spec.parametrizations:
        _print_transfer(_write_transfer(spec, rows, a.loss))
    comp = cooldown_comparison(rows, a.loss)
    if comp:
        gaps = [c["gap"] for c in comp]
        print(f"branch - scratch {a.loss} loss over {len(comp)} pairs: mean {sum(gaps) / len(gaps):+.4f}, "
              f"min {min(gaps):+.4f}, max {max(gaps):+.4f}")
        for c in comp:
            print(f"  {c['size']:10s} D={c['D']:.3g} lr={c['lr']:g}: branch {c['branch_loss']:.4f} "
                  f"scratch {c['scratch_loss']:.4f} gap {c['gap']:+.4f}")
    return 0


def _read_points(path, n_col, d_col, loss_col, budget_col=None) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise SweepSpecError(f"points file {path} cannot be read ({e.strerror}); give the CSV of (N, D, loss) "
                             "points, e.g. a sweep's points.csv") from None
    cols = [c for c in (n_col, d_col, loss_col, budget_col) if c]
    if rows and any(c not in rows[0] for c in cols):
        missing = [c for c in cols if c not in rows[0]]
        raise SweepSpecError(f"{path}: no column(s) {missing}; columns are {list(rows[0])}")
    def budget(r):       # a grid design's points have no budget (an empty cell)
        v = r[budget_col] if budget_col else ""
        if v in ("", "None", "nan"):
            return None
        try:
            return float(v)
        except ValueError:
            raise SweepSpecError(f"{path}: column {budget_col!r}: {v!r} is not a number (or empty)") from None

    def number(r, col, line):
        try:
            return float(r[col])
        except (TypeError, ValueError):
            raise SweepSpecError(f"{path}: line {line}, column {col!r}: {r[col]!r} is not a number") from None

    # line 1 is the header: data row i is line i + 2
    return [{"N": number(r, n_col, i + 2), "D": number(r, d_col, i + 2), "loss": number(r, loss_col, i + 2),
             "budget": budget(r)} for i, r in enumerate(rows)]


def cmd_fit(a) -> int:
    at_least("--bootstrap", a.bootstrap, 0, "0 = no confidence intervals")
    at_least("--top-k", a.top_k, 1, "grid starts refined by L-BFGS")
    top_k = None if a.all_starts else a.top_k
    if a.csv:
        points = _read_points(a.csv, a.n_col, a.d_col, a.loss_col, a.budget_col)
        out = Path(a.out or "fit.json")
    elif a.spec:
        spec = load_spec(a.spec)
        _, points = _collect(spec, a.kind, a.loss)
        out = Path(a.out or spec.out_dir / "fit.json")
    else:
        raise UsageError("fit: give a sweep spec or --csv FILE")
    groups = _fit_groups(spec) if a.spec and not a.csv else ()
    if groups:       # fit.json: {"variants": {variant: fits}}; the variants' points share one N axis (active)
        fits = {"variants": {v: fit_all([p for p in points if p["variant"] == v], bootstrap=a.bootstrap,
                                        top_k=top_k, progress=FitProgress()) for v in groups}}
    else:
        fits = fit_all(points, bootstrap=a.bootstrap, top_k=top_k, progress=FitProgress())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(fits, indent=2))
    for v, one in (fits["variants"].items() if groups else [("", fits)]):
        _print_fit(one, f"{v}: " if v else "")
    print(f"wrote {out}")
    return 0


def _print_fit(fits: dict, tag: str = "") -> None:
    c = fits.get("chinchilla")
    if c:
        ci = c.get("intervals", {})
        print(tag + "L(N, D) = E + A/N^alpha + B/D^beta: " + ", ".join(
            f"{k}={c[k]:.4g}" + (f" [{ci[k][0]:.4g}, {ci[k][1]:.4g}]" if k in ci else "")
            for k in ("E", "A", "B", "alpha", "beta")))
    else:
        print(f"{tag}parametric fit skipped: {fits.get('chinchilla_skipped')}")
    iso = fits.get("isoflop")
    for reason in (iso or {}).get("skipped", []):
        print(f"{tag}IsoFLOP: skipped {reason}")
    if iso and iso.get("n_opt"):
        print(f"{tag}IsoFLOP: N*(C) = {iso['n_opt']['coef']:.3g} C^{iso['n_opt']['exponent']:.3f}, "
              f"D*(C) = {iso['d_opt']['coef']:.3g} C^{iso['d_opt']['exponent']:.3f}")


def cmd_plot(a) -> int:
    from .plots import plot_all          # here: matplotlib takes seconds to import, only plot needs it
    if a.spec:
        spec = load_spec(a.spec)
        pts_path, fit_path = spec.out_dir / "points.csv", spec.out_dir / "fit.json"
        out_dir = Path(a.out_dir or spec.out_dir / "plots")
        if spec.parametrizations:     # an LR-transfer sweep: its plot needs the runs, not a fit
            from .mup_plots import plot_lr_transfer
            transfer = _write_transfer(spec, ResultsStore(spec.results_path).rows(), "val")
            if not transfer:
                raise UsageError(f"{spec.results_path}: no finished runs yet: run `sweep run` first")
            _print_transfer(transfer)
            out_dir.mkdir(parents=True, exist_ok=True)
            print(f"wrote {plot_lr_transfer(transfer, out_dir / 'lr_transfer.png')}")
            if not fit_path.exists():
                return 0
    elif not (a.csv and a.fit):
        raise UsageError("plot: give a sweep spec, or --csv FILE and --fit FILE")
    else:
        pts_path, fit_path, out_dir = Path(a.csv), Path(a.fit), Path(a.out_dir or ".")
    if not fit_path.exists():
        raise UsageError(f"{fit_path} not found: run `sweep fit` first")
    if not pts_path.is_file():
        raise UsageError(f"{pts_path} not found: run `sweep collect` first, or give --csv FILE")
    with open(pts_path, newline="") as f:
        header = next(csv.reader(f), [])
    budget_col = a.budget_col if a.budget_col in header else None    # optional for plots
    fits = json.loads(fit_path.read_text())
    if "variants" in fits:     # a [moe] sweep: each variant's points and fit in plots/<variant>/
        for v, one in fits["variants"].items():
            points = _read_points(pts_path.parent / f"points-{v}.csv", a.n_col, a.d_col, a.loss_col, budget_col)
            for path in plot_all(points, one, out_dir / v):
                print(f"wrote {path}")
        return 0
    points = _read_points(pts_path, a.n_col, a.d_col, a.loss_col, budget_col)
    for path in plot_all(points, fits, out_dir):
        print(f"wrote {path}")
    return 0


SPEC_HELP = "the sweep spec: a TOML file with [sweep], [family], [design], ... (e.g. configs/sweeps/tiny.toml; see scaling/README.md)"


def build_parser() -> argparse.ArgumentParser:
    p = ArgParser(prog="meshformer sweep", description="Scaling-law sweeps: plan, run, collect, fit, plot.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("plan", help="print every run (N, D, C) without running")
    s.add_argument("spec", help=SPEC_HELP); s.add_argument("--json", action="store_true", help="the runs as JSON")
    s = sub.add_parser("run", help="run what is left locally, or submit Slurm job arrays")
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--jobs", "-k", type=int, default=1, help="runs at a time (Slurm: the %%k array throttle)")
    s.add_argument("--slurm", action="store_true", help="submit as Slurm job arrays instead of running here")
    s.add_argument("--wait", action="store_true", help="with --slurm: block until the arrays end")
    s.add_argument("--profile", help="with --slurm: cluster profile (a name in configs/slurm/ or a TOML path); "
                                     "default: the spec's [slurm] profile")
    s.add_argument("--sbatch-arg", action="append", help="extra #SBATCH line, e.g. --sbatch-arg=--partition=cpu")
    s.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    s = sub.add_parser("status", help="done / running / failed counts; failed runs with their error")
    s.add_argument("spec", help=SPEC_HELP)
    s.add_argument("--verbose", "-v", action="store_true", help="every run, not only failed / running ones")
    s = sub.add_parser("exec", help="run ONE planned run (what each local worker / array task does)")
    s.add_argument("spec", help=SPEC_HELP); s.add_argument("--run-id", help="the planned run to run (see `sweep plan`)")
    s.add_argument("--run-list", help="a stage's run ids, one a line (an array task: with --run-index)")
    s.add_argument("--run-index", type=int, help="which line of --run-list (the array task's index)")
    s.add_argument("--run.overwrite", dest="overwrite", choices=["true", "false"],
                   help="false: a restarted task; resume the run from its newest checkpoint")
    for name, hlp in (("collect", "export results.csv and points.csv; compare branches with scratch runs"),
                      ("fit", "fit the laws to a sweep, or to any CSV with --csv"),
                      ("plot", "PNG plots from points.csv and fit.json")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("spec", nargs="?", help=SPEC_HELP + ("" if name == "collect" else
                                                           "; or leave it out and give --csv"))
        s.add_argument("--kind", default="auto", choices=["auto", "branch", "scratch"],
                       help="which runs are points (auto: branches if the sweep has them)")
        s.add_argument("--loss", default="val", choices=["val", "train"],
                       help="final validation loss (the train loss for runs without one), or final train loss")
        if name in ("fit", "plot"):
            s.add_argument("--csv", help="points from this CSV instead of a sweep")
            s.add_argument("--n-col", default="N", help="--csv column of parameters N")
            s.add_argument("--d-col", default="D", help="--csv column of tokens D")
            s.add_argument("--loss-col", default="loss", help="--csv column of the loss")
            s.add_argument("--budget-col", default=None if name == "fit" else "budget",
                           help="compute budget column: adds the IsoFLOP analysis")
        if name == "fit":
            s.add_argument("--out", help="fit JSON (default: the sweep folder's fit.json)")
            s.add_argument("--bootstrap", type=int, default=0, help="resamples for 95%% intervals (each a refit: "
                           "about 0.2-0.5 s on a few hundred points; progress goes to stderr)")
            s.add_argument("--top-k", type=int, default=64, help="L-BFGS from the best K grid starts")
            s.add_argument("--all-starts", action="store_true", help="L-BFGS from all 4500 starts (slow)")
        if name == "plot":
            s.add_argument("--fit", help="fit JSON (with --csv)")
            s.add_argument("--out-dir")
    return p


COMMANDS = {"plan": cmd_plan, "run": cmd_run, "status": cmd_status, "exec": cmd_exec,
            "collect": cmd_collect, "fit": cmd_fit, "plot": cmd_plot}


def main(argv: list[str] | None = None, launcher: ArrayLauncher | None = None, debug: bool = False) -> int:
    """launcher: how to render and place array tasks (trainer/sweep_slurm.py); needed by run --slurm."""
    return report_errors("meshformer sweep", lambda: _main(argv, launcher), debug)


def _main(argv: list[str] | None, launcher: ArrayLauncher | None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.command in ("run", "exec"):
            return COMMANDS[a.command](a, launcher)
        return COMMANDS[a.command](a)
    except (FileNotFoundError, RuntimeError) as e:   # a results store or a run folder that is not there
        raise MeshformerError(f"sweep {a.command}: {e}") from e
