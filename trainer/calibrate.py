"""`meshformer plan calibrate`: time short real runs on this machine's ranks, fit a cluster profile
to them, write it, and say how well it predicts layouts the fit did not see.

  meshformer plan calibrate [--config FILE] [--out calibrated.toml] [--nproc 4] [--steps 8]
                            [--rounds 1] [--fit A,B,...] [--holdout C,D,...] [--save-measured F | --from-measured F]
                            [--section.key value ...]

One torchrun launch (trainer/calibrate_worker.py) runs every layout in the same processes; the
fit and the profile are parallel/planner/calibrate.py's. gloo on CPU only for now.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from core.cli_args import ArgParser, at_least
from core.errors import UsageError, report_errors
from parallel.planner.calibrate import Measured, base_profile, fit, profile_toml, report
from parallel.planner.run_config import config_layout, read_run_config

from .calibrate_worker import WARMUP_STEPS

GLOBAL_BATCH = 16        # sequences per optimizer step, the same for every layout
# A model small enough for a few steps per layout in seconds on 2 cores, with dims that TP 4 splits.
MODEL = ["--model.dim", "64", "--model.n_layers", "4", "--model.n_heads", "4", "--model.n_kv_heads", "4",
         "--model.ffn_hidden", "128", "--model.vocab_size", "320", "--train.seq_len", "64", "--optim.warmup_steps", "1"]
# Layouts of a 4-rank cluster: name -> (parallel overrides, the DP degree that splits the batch, grad accum).
LAYOUTS = {
    "fsdp4": (["--parallel.dp_shard", "4"], 4, 1),
    "fsdp4-accum2": (["--parallel.dp_shard", "4"], 4, 2),
    "ddp4": (["--parallel.dp_replicate", "4", "--parallel.dp_shard", "1"], 4, 1),
    "tp4": (["--parallel.tp", "4", "--parallel.dp_shard", "1"], 1, 1),
    "tp2-fsdp2": (["--parallel.tp", "2", "--parallel.dp_shard", "2"], 2, 1),
    "tp2-ddp2": (["--parallel.tp", "2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], 2, 1),
    "pp4": (["--parallel.pp", "4", "--parallel.dp_shard", "1"], 1, 1),
    "pp2-fsdp2": (["--parallel.pp", "2", "--parallel.dp_shard", "2"], 2, 1),
    "pp2-ddp2": (["--parallel.pp", "2", "--parallel.dp_replicate", "2", "--parallel.dp_shard", "1"], 2, 1),
    "tp2-pp2": (["--parallel.tp", "2", "--parallel.pp", "2", "--parallel.dp_shard", "1"], 1, 1),
}
# Fit on one of each kind, check on others of each kind: DP (ddp4), TP (tp2-ddp2), PP (pp2-fsdp2), mixed (tp2-pp2).
DEFAULT_FIT = ("fsdp4", "fsdp4-accum2", "tp4", "pp4", "tp2-fsdp2", "pp2-ddp2")
DEFAULT_HOLDOUT = ("ddp4", "tp2-ddp2", "pp2-fsdp2", "tp2-pp2")
WORLD = 4


def layout_args(name: str) -> list[str]:
    par, dp, accum = LAYOUTS[name]
    return par + ["--train.batch_size", str(GLOBAL_BATCH // dp // accum), "--train.grad_accum", str(accum)]


def _names(flag: str, text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in LAYOUTS]
    if bad or not names:
        raise UsageError(f"{flag}: {','.join(bad) or repr(text)} is not a layout; choose among {', '.join(LAYOUTS)}")
    return names


def _parser() -> ArgParser:
    p = ArgParser(prog="meshformer plan calibrate", formatter_class=argparse.RawDescriptionHelpFormatter,
                  description="Time a few short real training runs on this machine's ranks (gloo, CPU), fit the "
                  "efficiency and overhead constants of a cluster profile to them, write the profile (read it with "
                  "`meshformer plan --cluster FILE`), and print predicted vs measured tokens/s for layouts the fit "
                  "did not use.",
                  epilog=f"layouts ({WORLD} ranks, {GLOBAL_BATCH} sequences per step): {', '.join(LAYOUTS)}\n"
                         "Further --section.key value arguments change the model and training of every run "
                         "(e.g. --model.dim 128).")
    p.add_argument("--config", default="configs/tiny.toml", help="run config the runs start from (default configs/tiny.toml)")
    p.add_argument("--out", default="calibrated.toml", help="where to write the fitted profile (default calibrated.toml)")
    p.add_argument("--report", default="", help="also write the measured and predicted figures as JSON here")
    p.add_argument("--nproc", type=int, default=WORLD, help=f"ranks to launch (the built-in layouts need {WORLD})")
    p.add_argument("--steps", type=int, default=8, help=f"steps per run; the first {WARMUP_STEPS} are not timed (default 8)")
    p.add_argument("--rounds", type=int, default=1, help="run every layout this many times, interleaved (default 1)")
    p.add_argument("--fit", default=",".join(DEFAULT_FIT), help=f"layouts fitted (default {','.join(DEFAULT_FIT)})")
    p.add_argument("--holdout", default=",".join(DEFAULT_HOLDOUT),
                   help=f"layouts only predicted, to check the fit (default {','.join(DEFAULT_HOLDOUT)})")
    p.add_argument("--timeout", type=float, default=900, help="seconds the whole launch may take (default 900)")
    p.add_argument("--save-measured", default="", help="write the launch's raw measurements (JSON) here")
    p.add_argument("--from-measured", default="",
                   help="fit and report on raw measurements written by --save-measured instead of launching runs")
    return p


def main(argv: list[str] | None = None, debug: bool = False) -> int:
    return report_errors("meshformer plan calibrate", lambda: _main(list(sys.argv[1:] if argv is None else argv)), debug)


def _main(argv: list[str]) -> int:
    args, overrides = _parser().parse_known_args(argv)
    if args.nproc != WORLD:
        raise UsageError(f"--nproc: {args.nproc}; the built-in layouts are for {WORLD} ranks")
    at_least("--steps", args.steps, WARMUP_STEPS + 2, f"the first {WARMUP_STEPS} are warm-up")
    at_least("--rounds", args.rounds, 1)
    at_least("--timeout", args.timeout, 1, "seconds")
    fit_names, held = _names("--fit", args.fit), _names("--holdout", args.holdout)
    if set(fit_names) & set(held):
        raise UsageError(f"--holdout: {','.join(sorted(set(fit_names) & set(held)))} is also in --fit; "
                         "a held-out layout must not be fitted")
    if not Path(args.config).is_file():
        raise UsageError(f"--config: {args.config} does not exist")
    common = MODEL + overrides + ["--train.steps", str(args.steps)]
    layouts = {}
    for name in fit_names + held:          # the planner's reading of each run, before any launch
        run = read_run_config(args.config, common + layout_args(name))
        if run.dtype != "fp32":
            raise UsageError(f"precision.dtype: {run.dtype}; calibrate times CPU ranks, which run fp32")
        layouts[name] = (run.model, config_layout(run, args.nproc))
    if args.from_measured:
        measured = _read_measured(args.from_measured, fit_names + held)
    else:
        measured = _launch(args, common, fit_names + held)
    if args.save_measured:
        Path(args.save_measured).write_text(json.dumps(measured, indent=1))
    machine, runs = measured["machine"], measured["layouts"]
    failed = {n: r["error"].strip().splitlines()[-1] for n, r in runs.items() if "error" in r}
    if failed:
        raise UsageError("calibrate: runs failed: " + "; ".join(f"{n}: {e}" for n, e in failed.items()))
    data = {n: Measured(n, *layouts[n], runs[n]["tokens_per_s"]) for n in fit_names + held}
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3 / args.nproc
    profile = fit(base_profile(machine, args.nproc, memory_gib), [data[n] for n in fit_names])
    Path(args.out).write_text(profile_toml(profile, f"fitted by meshformer plan calibrate on {', '.join(fit_names)}"))
    rows = {"fit": report(profile, [data[n] for n in fit_names]), "holdout": report(profile, [data[n] for n in held])}
    print(f"\n{'layout':<14} {'role':<8} {'predicted':>10} {'measured':>10} {'error':>7}")
    for role, rs in rows.items():
        for name, pred, meas, err in rs:
            print(f"{name:<14} {role:<8} {pred:>10,.0f} {meas:>10,.0f} {err:>+7.1%}")
    worst = max(abs(r[3]) for r in rows["holdout"]) if held else 0.0
    print(f"\nheld-out layouts: largest |error| {worst:.1%}; profile written to {args.out} "
          f"(use it: meshformer plan --cluster {args.out} ...)")
    if args.report:
        Path(args.report).write_text(json.dumps({"machine": machine, "steps": {n: runs[n].get("steps", []) for n in data},
                                                 **{k: [dict(zip(("name", "predicted", "measured", "error"), r)) for r in v]
                                                    for k, v in rows.items()}}, indent=1))
    return 0


MACHINE_KEYS = ("matmul_flops", "copy_bytes_per_s", "allreduce_bus_bytes_per_s", "step_latency_s")


def _read_measured(path: str, names: list[str]) -> dict:
    """A launch's raw figures as --save-measured wrote them: the machine's and, for each layout
    named, its tokens/s (or the error its run ended with)."""
    try:
        measured = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--from-measured: cannot read {path}: {e}") from None
    hint = "write one with --save-measured"
    machine = measured.get("machine") if isinstance(measured, dict) else None
    layouts = measured.get("layouts") if isinstance(measured, dict) else None
    if not isinstance(machine, dict) or not isinstance(layouts, dict):
        raise UsageError(f"--from-measured: {path} is not a calibrate measurement (no 'machine' and 'layouts'); {hint}")
    bad = [k for k in MACHINE_KEYS if not _positive(machine.get(k))]
    if bad:
        raise UsageError(f"--from-measured: {path}: machine.{bad[0]} is missing or not a positive number; {hint}")
    missing = [n for n in names if n not in layouts]
    if missing:
        raise UsageError(f"--from-measured: {path} has no measurement of {', '.join(missing)}; {hint} "
                         "in a launch that runs them")
    bad = [n for n in names if not isinstance(layouts[n], dict)
           or ("error" not in layouts[n] and not _positive(layouts[n].get("tokens_per_s")))]
    if bad:
        raise UsageError(f"--from-measured: {path}: layouts.{bad[0]}.tokens_per_s is missing or not a positive number")
    return measured


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(args, common: list[str], names: list[str]) -> dict:
    """One torchrun launch running every layout; progress lines pass through as they come."""
    print(f"calibrate: {args.nproc} ranks, {len(names)} layouts x {args.rounds} round(s) x {args.steps} steps", flush=True)
    with tempfile.TemporaryDirectory(prefix="mf-calibrate-") as tmp:
        out = Path(tmp) / "measured.json"
        specs = [f"{n}={' '.join(['--config', args.config] + common + layout_args(n))}" for n in names]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
               "-m", "trainer.calibrate_worker", str(out), str(args.rounds), *specs]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        with open(Path(tmp) / "stderr", "w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            try:
                for line in proc.stdout:       # the trainer's own lines stay quiet; ours are the progress
                    if line.startswith("calibrate ["):
                        print(line, end="", flush=True)
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise UsageError(f"--timeout: the launch took more than {args.timeout:g} s") from None
            if proc.returncode or not out.exists():
                err.seek(0)
                tail = [ln for ln in err.read().splitlines() if ln.strip() and "Warning" not in ln][-1:]
                raise UsageError(f"calibrate: the launch of {args.nproc} ranks failed (exit {proc.returncode}): "
                                 + (tail[0] if tail else "no message"))
        return json.loads(out.read_text())
