"""`meshformer` command line: one entry point, subcommands owned by their packages."""
from __future__ import annotations

import argparse
import importlib
import sys

from trainer.config_parse import ConfigError

# subcommand -> (module with main(argv) -> int, one-line help)
SUBCOMMANDS = {
    "train": ("trainer.cli", "train a model: --config FILE [--section.key value ...]"),
    "generate": ("trainer.cli", "sample text from a run's latest checkpoint"),
    "prepare": ("data.prepare", "tokenize text corpora into webdataset shards"),
    "plan": ("parallel.planner.cli", "predict memory and speed of parallel layouts on a cluster"),
    "sweep": ("scaling.cli", "scaling-law sweeps: plan, run, collect, fit, plot"),
    "export": ("trainer.export", "write a checkpoint as Hugging Face safetensors"),
    "slurm": ("launch.slurm", "render or submit an sbatch script for a run"),
}


def _split_config_args(prog: str, argv: list[str], description: str):
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog="Any --section.key value pair overrides the config, e.g. --optim.lr 3e-4.")
    p.add_argument("--config", default=None, help="TOML config file (default: built-in defaults = configs/tiny.toml)")
    return p


def train_main(argv: list[str]) -> int:
    p = _split_config_args("meshformer train", argv, "Train a Transformer LM.")
    args, overrides = p.parse_known_args(argv)
    from trainer.config import load_config
    from trainer.train import train
    cfg = load_config(args.config, overrides)
    train(cfg)
    return 0


def generate_main(argv: list[str]) -> int:
    p = _split_config_args("meshformer generate", argv, "Sample from the latest checkpoint of run.dir.")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=40)
    args, overrides = p.parse_known_args(argv)
    import torch
    from pathlib import Path

    import data as data_pkg
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    from trainer.config import load_config
    from trainer.generate import generate
    from trainer.model import Transformer
    cfg = load_config(args.config, overrides)
    ckpts = complete_checkpoints(Path(cfg.run.dir) / "checkpoints")
    if not ckpts:
        raise ConfigError(f"run.dir: no complete checkpoint under {cfg.run.dir}/checkpoints; train first")
    model = Transformer(cfg.model)
    load_model_weights(model, ckpts[-1])
    tok = data_pkg.build_tokenizer(cfg.data)
    prompt = torch.tensor([tok.encode(args.prompt)])
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k,
                   torch.Generator().manual_seed(cfg.run.seed), eot_id=tok.eot_id)
    print(tok.decode(out[0].tolist()))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        lines = [f"  {name:<9} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
        print("usage: meshformer <command> [args]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmeshformer: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    name, rest = argv[0], argv[1:]
    try:
        if name == "train":
            return train_main(rest)
        if name == "generate":
            return generate_main(rest)
        module = importlib.import_module(SUBCOMMANDS[name][0])
        return int(module.main(rest) or 0)
    except ConfigError as e:
        print(f"meshformer {name}: config error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(SUBCOMMANDS[name][0].split(".")[0]):
            print(f"meshformer {name}: not available in this build ({e})", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
