"""`meshformer eval`: loss, perplexity and bits per byte of a checkpoint on a data source.

    meshformer eval runs/tiny                                   # the run's validation split
    meshformer eval runs/tiny --quantize int8                   # what int8 weights cost
    meshformer eval runs/tiny --data.val_urls data/other/ --batches 20 --json

Bits per byte compare models with different tokenizers: the summed loss in bits over the bytes
of the text the evaluated tokens decode to. Each end-of-text token counts as one byte (the
separator it stands for), so for the byte tokenizer bits per byte is loss / ln 2 exactly.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys

import torch

import data as data_pkg
from core.cli_args import ArgParser, at_least, split_overrides
from core.errors import DataError
from core.run_config import keys_help
from parallel.local_engine import token_loss_sum
from trainer.generate import load_weights, open_run
from trainer.inference_weights import DTYPES, QUANTIZE, prepare_weights


def text_bytes(tok, ids: torch.Tensor) -> int:
    """Bytes of text the token ids stand for; an end-of-text token counts one byte."""
    ids = ids.tolist()
    eot = sum(1 for i in ids if i == tok.eot_id)
    if tok.ident == "bytes":          # one id, one byte (decoding a cut UTF-8 sequence would add U+FFFD)
        return len(ids)
    return len(tok.decode([i for i in ids if i != tok.eot_id]).encode("utf-8")) + eot


@torch.no_grad()
def evaluate(model, batches, tok) -> dict:
    """Token-weighted mean loss over `batches` of (inputs, labels), perplexity and bits per byte."""
    model.eval()
    loss_sum, tokens, nbytes = 0.0, 0, 0
    for inputs, labels in batches:
        inputs, labels = torch.as_tensor(inputs), torch.as_tensor(labels)
        logits = model(inputs)
        loss_sum += float(token_loss_sum(logits, labels))
        for row in labels:
            row = row[row != data_pkg.IGNORE]
            tokens += row.numel()
            nbytes += text_bytes(tok, row)
    if not tokens:
        raise DataError("the data source gave no tokens to evaluate; give --data.val_urls with text or shards")
    loss = loss_sum / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss_sum / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes}


def parser() -> ArgParser:
    p = ArgParser(prog="meshformer eval", formatter_class=argparse.RawDescriptionHelpFormatter,
                  usage="meshformer eval RUN_DIR [--checkpoint step-N|PATH] [--batches N] [--split val|train] "
                        "[--quantize int8] [--json]\n"
                        "       meshformer eval --config FILE [options] [--section.key value ...]",
                  description=__doc__.split("\n\n", 1)[1],
                  epilog="Any --section.key value pair overrides the run's config, e.g. --data.val_urls PATH "
                         "(any data source `meshformer train` reads) or --train.batch_size 4.\n\n" + keys_help())
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR", help="a run folder (default: run.dir of --config)")
    p.add_argument("--config", metavar="FILE", default=None, help="TOML config instead of RUN_DIR (default: none)")
    p.add_argument("--checkpoint", metavar="step-N|PATH", default=None,
                   help="step-N of the run, or a checkpoint folder (default: the newest complete checkpoint)")
    p.add_argument("--split", choices=("val", "train"), default="val",
                   help="val: data.val_urls, else the built-in corpus' validation split; train: data.urls in a "
                        "seeded order (default: %(default)s)")
    p.add_argument("--batches", type=int, default=0, metavar="N",
                   help="batches of train.batch_size x train.seq_len; 0 = the whole validation split "
                        "(--split train needs N >= 1) (default: %(default)s)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (default: %(default)s)")
    p.add_argument("--quantize", choices=list(QUANTIZE), default="none",
                   help="weight-only quantization through torchao (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object (default: off)")
    return p


def main(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = parser().parse_args(own)
    at_least("--batches", args.batches, 0, "0 = the whole validation split")
    if args.split == "train" and args.batches == 0:
        at_least("--batches", args.batches, 1, "--split train never ends: say how many batches")
    cfg, tok, ckpt = open_run(args.run_dir, args.config, args.checkpoint, overrides)
    loader = data_pkg.build_loader(cfg.data, split=args.split, seq_len=cfg.train.seq_len,
                                   batch_size=cfg.train.batch_size, dp_rank=0, dp_size=1, seed=cfg.run.seed,
                                   tokenizer=tok)
    if loader is None:
        raise DataError("no validation data: the run reads no built-in corpus; give --data.val_urls PATH "
                        "or --split train --batches N")
    model = prepare_weights(load_weights(cfg, ckpt, prog="meshformer eval"), args.dtype, args.quantize)
    batches = itertools.islice(iter(loader), args.batches) if args.batches else iter(loader)
    result = {**evaluate(model, batches, tok), "split": args.split, "dtype": args.dtype, "quantize": args.quantize}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  bits/byte "
              f"{result['bits_per_byte']:.4f}  ({result['tokens']} tokens, {result['bytes']} bytes, "
              f"{args.split} split, {args.dtype}, quantize {args.quantize})")
    sys.stdout.flush()
    return 0
