"""`meshformer` command line: one entry point, subcommands owned by their packages."""
from __future__ import annotations

import argparse
import os
import signal
import sys

from core.accelerate_config import under_run_config
from core.cli_args import ArgParser
from core.errors import report_errors
from core.run_config import config_from_tables, keys_help, load_config, load_tables

# Each command imports what it runs when it runs (plain imports, no cycle to dodge): `meshformer
# plan` or `--help` should not wait seconds for torch, which only train/generate/export/slurm need.


def _split_config_args(prog: str, argv: list[str], description: str):
    p = ArgParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any --section.key value pair overrides the config, e.g. --optim.lr 3e-4.\n\n"
                                       + keys_help())
    p.add_argument("--config", default=None, help="TOML config file (default: built-in defaults = configs/tiny.toml)")
    return p


def _first_rank(env) -> bool:
    """Rank 0 under any launcher, read before the process group exists (one line per job, not per rank)."""
    for name in ("RANK", "SLURM_PROCID", "PMI_RANK", "OMPI_COMM_WORLD_RANK"):
        if env.get(name, "").isdigit():
            return env[name] == "0"
    return True


def train_main(argv: list[str], debug: bool = False) -> int:
    p = _split_config_args("meshformer train", argv, "Train a Transformer LM. Ctrl-C saves at the end of the step "
                           "and exits (75, like SIGTERM); a second Ctrl-C stops at once without saving.")
    p.add_argument("--print-config", action="store_true", help="print the resolved config (TOML) and exit")
    p.add_argument("--dry-run", action="store_true", help="build the layout, model, optimizer and data loaders, "
                   "read one batch, and stop before the first step (run.dir is not touched)")
    p.add_argument("--accelerate-config", default="", metavar="FILE", help="an accelerate config YAML: its "
                   "mixed_precision, fsdp_config and parallelism_config fill the keys --config and the overrides "
                   "leave unset (launch.accelerate_config; under `accelerate launch` what it exported is read)")
    args, overrides = p.parse_known_args(argv)
    tables, accelerate_line = under_run_config(load_tables(args.config, overrides), args.accelerate_config, os.environ)
    cfg = config_from_tables(tables)
    if accelerate_line and _first_rank(os.environ):
        print(accelerate_line, file=sys.stderr, flush=True)
    if args.print_config:            # before torch is imported: instant
        print(cfg.to_toml(), end="")
        return 0
    from launch.preemption import EXIT_PREEMPTED
    from trainer.train import train
    # A Slurm warning signal (USR1) that arrives before the loop catches it or after the final
    # save must not kill the process with 138 (the batch script would requeue a finished run).
    # The loop installs its own handler in between; SIGTERM keeps its default (scancel works).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    try:
        summary = train(cfg, dry_run=args.dry_run)
    except KeyboardInterrupt:        # Ctrl-C before the loop catches it, or a second one: no save
        if debug:
            raise
        print(f"meshformer train: interrupted by Ctrl-C; nothing saved since the newest checkpoint in "
              f"{cfg.run.dir}/checkpoints (if any)", file=sys.stderr)
        return 130                   # 128 + SIGINT, what a shell reports for Ctrl-C
    return EXIT_PREEMPTED if summary.get("preempted") else 0


def generate_main(argv: list[str], debug: bool = False) -> int:
    from trainer.generate import main
    return main(argv)


def eval_main(argv: list[str], debug: bool = False) -> int:
    from trainer.perplexity import main
    return main(argv)


def prepare_main(argv: list[str], debug: bool = False) -> int:
    from data.prepare import main
    return main(argv, debug=debug)


def plan_main(argv: list[str], debug: bool = False) -> int:
    if argv[:1] == ["calibrate"]:            # runs training, so it lives here, not in parallel/planner
        from trainer.calibrate import main as calibrate
        return calibrate(argv[1:], debug=debug)
    from parallel.planner.cli import main
    return main(argv, debug=debug)


def sweep_main(argv: list[str], debug: bool = False) -> int:
    from scaling.cli import main
    from trainer.sweep_slurm import LAUNCHER      # job arrays through launch/'s sbatch renderer
    return main(argv, launcher=LAUNCHER, debug=debug)


def export_main(argv: list[str], debug: bool = False) -> int:
    from trainer.export import main
    return main(argv, debug=debug)


def doctor_main(argv: list[str], debug: bool = False) -> int:
    p = _split_config_args("meshformer doctor", argv, "Check the environment a job needs: torch build, devices, "
                           "NCCL/IB variables, free disk and write access in run.dir, and (under a launcher) that "
                           "every node sees the same run.dir. Exit status 1 on a problem.")
    args, overrides = p.parse_known_args(argv)
    from launch.doctor import run_checks
    return run_checks(load_config(args.config, overrides))


def mup_main(argv: list[str], debug: bool = False) -> int:
    from trainer.mup_check import main
    return main(argv, debug=debug)


def slurm_main(argv: list[str], debug: bool = False) -> int:
    from launch.slurm_submit import main
    return main(argv, debug=debug)


# subcommand -> (main(argv) -> int, one-line help); each package owns its command's main
SUBCOMMANDS = {
    "train": (train_main, "train a model: --config FILE [--section.key value ...]"),
    "generate": (generate_main, "sample text from a run: RUN_DIR [--prompt TEXT] [--checkpoint step-N]"),
    "eval": (eval_main, "loss, perplexity and bits per byte of a run on a data source: RUN_DIR [--quantize int8]"),
    "prepare": (prepare_main, "tokenize text corpora into webdataset shards"),
    "plan": (plan_main, "predict memory and speed of parallel layouts on a cluster"),
    "sweep": (sweep_main, "scaling-law sweeps: plan, run, collect, fit, plot"),
    "export": (export_main, "a run as a Hugging Face model folder (weights + tokenizer): RUN_DIR OUT"),
    "mup": (mup_main, "muP coordinate check: mup check [--widths 64,128,256,512] [--steps 5]"),
    "slurm": (slurm_main, "render or submit an sbatch script for a run"),
    "doctor": (doctor_main, "check torch, devices, NCCL/IB variables, disk and a shared run.dir before a job"),
}


def version() -> str:
    """`meshformer 0.1.0 (torch 2.13.0, Python 3.11.7)`: from the installed metadata (no torch import)."""
    from importlib.metadata import PackageNotFoundError, version as installed
    try:
        ours = installed("meshformer")
    except PackageNotFoundError:     # a checkout on PYTHONPATH, not installed
        ours = "(not installed)"
    try:
        torch_version = installed("torch")
    except PackageNotFoundError:
        torch_version = "missing"
    return f"meshformer {ours} (torch {torch_version}, Python {sys.version.split()[0]})"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv            # show the stack trace of a bad-input error too
    argv = [a for a in argv if a != "--debug"]
    if argv[:1] in (["--version"], ["-V"]):
        print(version())
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: meshformer <command> [args] [--debug] | meshformer --version\n\ncommands:\n" + "\n".join(lines)
              + "\n\n`meshformer <command> --help` lists its options (and every config key);"
              " --debug shows the stack trace of an error.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmeshformer: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    command, _ = SUBCOMMANDS[name]
    return report_errors(f"meshformer {name}", lambda: command(rest, debug), debug)


if __name__ == "__main__":
    sys.exit(main())
