"""`meshformer mup check`: the coordinate check of Yang et al. (Tensor Programs V, section 7 and
Microsoft mup's `get_coord_data`). Models of several widths train a few steps on the same batches
with the same LR; after each step the mean absolute value per coordinate of every layer's output
(token embedding, each block, the logits) is recorded. Under muP these sizes stay flat as the width
grows (every layer updates by Theta(1) per coordinate whatever the width); under sp they grow with
width once training has moved the weights, which is why an LR tuned at one width does not transfer.

    meshformer mup check [--widths 64,128,256,512] [--steps 5] [--parametrization both]
                         [--out runs/mup_check] [--config FILE] [--section.key value ...]

Writes OUT/coord_check.json (the numbers) and OUT/coord_check.png (one row per parametrization, one
panel per step, one line per layer, x = width). The widening keeps model.n_heads (each head grows,
so muP's 1/head_dim attention scale is exercised); the base width is the smallest one (or
model.mup_base_dim if set). The LR is optim.lr, held constant (no warm-up: it would hide the growth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import data as data_pkg
from core.cli_args import ArgParser, split_overrides
from core.errors import UsageError, report_errors
from core.run_config import Config, load_config
from scaling.mup_plots import plot_coord_check
from trainer.model import Transformer
from trainer.optim import build_optimizer
from trainer.vocab import resolve_vocab

PARAMETRIZATIONS = {"both": ("sp", "mup"), "sp": ("sp",), "mup": ("mup",)}


def corpus_batches(cfg: Config, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n training batches of the configured data (the built-in corpus by default);
    model.vocab_size 0 (auto) is resolved from its tokenizer, as training does."""
    tok = data_pkg.build_tokenizer(cfg.data)
    resolve_vocab(cfg.model, tok, cfg.data.tokenizer)
    loader = data_pkg.build_loader(cfg.data, split="train", seq_len=cfg.train.seq_len,
                                   batch_size=cfg.train.batch_size, dp_rank=0, dp_size=1, seed=cfg.run.seed, tokenizer=tok)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def _layers(model: Transformer) -> dict[str, torch.nn.Module]:
    """The modules whose outputs are measured, in forward order."""
    named = {"embedding": model.tok_embeddings}
    named.update({f"block {i}": block for i, block in model.layers.items()})
    named["logits"] = model.output
    return named


def measure(cfg: Config, width: int, parametrization: str, base_dim: int, batches, steps: int) -> dict:
    """{layer: [mean |activation| after 0, 1, ..., steps optimizer steps]} for one width."""
    mc = dataclasses.replace(cfg.model, dim=width, parametrization=parametrization, mup_base_dim=base_dim,
                             mup_base_head_dim=0)
    model = Transformer(mc)
    model.init_weights(cfg.run.seed)
    optim_cfg = dataclasses.replace(cfg.optim, fused=False)
    optimizer = build_optimizer(model, optim_cfg, torch.device("cpu"))
    sizes: dict[str, list[float]] = {name: [] for name in _layers(model)}
    hooks = [module.register_forward_hook(lambda mod, inp, out, name=name: sizes[name].append(out.detach().abs().mean().item()))
             for name, module in _layers(model).items()]
    try:
        for step in range(steps + 1):           # the forward after `step` updates; no update after the last
            tokens, targets = batches[step]
            logits = model(tokens)
            if step == steps:
                break
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        for h in hooks:
            h.remove()
    return sizes


def coord_check(cfg: Config, widths: list[int], steps: int, parametrizations, batches=None) -> dict:
    """The coordinate-check numbers: {"records": {par: {layer: {width: [size per step]}}}, ...}."""
    batches = batches if batches is not None else corpus_batches(cfg, steps + 1)
    base = cfg.model.mup_base_dim or min(widths)
    records = {}
    for par in parametrizations:
        per_width = {w: measure(cfg, w, par, base, batches, steps) for w in widths}
        layers = list(next(iter(per_width.values())))
        records[par] = {layer: {str(w): per_width[w][layer] for w in widths} for layer in layers}
    return {"widths": list(widths), "steps": steps, "base_dim": base, "lr": cfg.optim.lr,
            "n_heads": cfg.model.n_heads, "n_layers": cfg.model.n_layers, "records": records}


def _widths(text: str) -> list[int]:
    try:
        widths = sorted({int(w) for w in text.split(",")})
    except ValueError:
        raise UsageError(f"--widths {text!r}: expected comma-separated integers, e.g. 64,128,256") from None
    if len(widths) < 2 or widths[0] < 1:
        raise UsageError(f"--widths {text!r}: give at least two positive widths, e.g. 64,128,256")
    return widths


def main(argv: list[str], debug: bool = False) -> int:
    return report_errors("meshformer mup", lambda: _main(argv), debug)


def _main(argv: list[str]) -> int:
    p = ArgParser(prog="meshformer mup", formatter_class=argparse.RawDescriptionHelpFormatter,
                  usage="meshformer mup check [--widths W,W,...] [--steps N] [--parametrization both|sp|mup] "
                        "[--out DIR] [--config FILE] [--section.key value ...]",
                  description=__doc__.split("\n\n")[0], epilog="Any --section.key value pair overrides the config.")
    p.add_argument("command", choices=["check"], help="check: the coordinate check")
    p.add_argument("--widths", default="64,128,256,512", help="model widths, comma-separated (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per width (default: %(default)s)")
    p.add_argument("--parametrization", choices=sorted(PARAMETRIZATIONS), default="both",
                   help="which to check (default: %(default)s)")
    p.add_argument("--out", default="runs/mup_check", help="output folder (default: %(default)s)")
    p.add_argument("--config", default=None, help="TOML config for everything but the width (default: configs' defaults)")
    own, overrides = split_overrides(argv)
    args = p.parse_args(own)
    widths = _widths(args.widths)
    if args.steps < 1:
        raise UsageError(f"--steps {args.steps}: must be >= 1")
    cfg = load_config(args.config, overrides)
    bad = [w for w in widths if w % cfg.model.n_heads or (w // cfg.model.n_heads) % 2]
    if bad:
        raise UsageError(f"--widths: {bad} not a multiple of 2 x model.n_heads={cfg.model.n_heads} "
                         "(the heads are kept; each needs an even size for RoPE)")
    torch.manual_seed(cfg.run.seed)
    result = coord_check(cfg, widths, args.steps, PARAMETRIZATIONS[args.parametrization])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "coord_check.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_coord_check(result, out / "coord_check.png")
    print(f"wrote {out / 'coord_check.json'} and {out / 'coord_check.png'}")
    return 0
