"""Sample text from a model with a KV cache: a quick look at what a checkpoint learned.

    meshformer generate runs/tiny --prompt "def "                  # the run folder is enough
    meshformer generate runs/tiny --checkpoint step-400 --temperature 0
    meshformer generate --config configs/tiny.toml [--section.key value ...]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from core.cli_args import ArgParser, at_least, split_overrides
from core.errors import ConfigError, UsageError
from core.run_config import keys_help, load_config
from trainer.checkpoint import load_model_weights
from trainer.model import KVCache, Transformer
from trainer.run_folder import TOKENIZER_FILE, describe, load_run_config, pick_checkpoint, run_tokenizer
from trainer.vocab import resolve_vocab


def check_request(prompt_len: int, max_new_tokens: int, temperature: float, top_k: int, limit: int) -> None:
    """Refuse, naming the option, a request the model cannot serve (before any weight is loaded)."""
    if prompt_len == 0:
        raise UsageError("--prompt: empty; give at least one character to continue")
    at_least("--tokens", max_new_tokens, 1, "new tokens to sample")
    at_least("--temperature", temperature, 0, "0 = greedy")
    at_least("--top-k", top_k, 0, "0 = sample among all tokens")
    if prompt_len >= limit:
        raise UsageError(f"--prompt: {prompt_len} tokens fill the context of model.max_seq_len={limit}; "
                         f"give at most {limit - 1}")
    if prompt_len + max_new_tokens > limit:
        raise UsageError(f"--tokens: {max_new_tokens} after a {prompt_len}-token prompt exceed model.max_seq_len="
                         f"{limit}; give at most {limit - prompt_len}")


@torch.no_grad()
def generate(model: Transformer, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 0, generator: torch.Generator | None = None, eot_id: int | None = None) -> torch.Tensor:
    """Extend `prompt` [B, T] by up to `max_new_tokens` tokens. The prompt is run once (prefill),
    then each new token attends to the cached keys and values of all earlier ones."""
    model.eval()
    check_request(prompt.shape[1], max_new_tokens, temperature, top_k, model.cfg.max_seq_len)
    cache = KVCache()
    logits = model(prompt, start_pos=0, cache=cache)[:, -1]
    out, pos = prompt, prompt.shape[1]
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            logits = logits.float() / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
        out = torch.cat([out, nxt], dim=1)
        if eot_id is not None and bool((nxt == eot_id).all()):
            break
        logits = model(nxt, start_pos=pos, cache=cache)[:, -1]
        pos += 1
    return out


def parser() -> ArgParser:
    p = ArgParser(prog="meshformer generate", formatter_class=argparse.RawDescriptionHelpFormatter,
                  usage="meshformer generate RUN_DIR [--prompt TEXT] [--checkpoint step-N|PATH] [--tokens N] "
                        "[--temperature T] [--top-k K]\n"
                        "       meshformer generate --config FILE [options] [--section.key value ...]",
                  description="Sample text from a run's checkpoint (the newest complete one unless --checkpoint\n"
                              "says); the checkpoint used is printed on stderr.\n\n" + __doc__.split("\n\n")[1],
                  epilog="Any --section.key value pair overrides the run's config, e.g. --run.seed 1.\n\n" + keys_help())
    p.add_argument("run_dir", nargs="?", metavar="RUN_DIR",
                   help="a run folder: its config.toml, tokenizer and checkpoints are used (default: run.dir of --config)")
    p.add_argument("--config", metavar="FILE", default=None,
                   help="TOML config instead of RUN_DIR (default: none; without RUN_DIR the built-in defaults = "
                        "configs/tiny.toml, run.dir runs/tiny)")
    p.add_argument("--checkpoint", metavar="step-N|PATH", default=None,
                   help="step-N (or N) of the run, or a checkpoint folder (default: the newest complete checkpoint)")
    p.add_argument("--prompt", default="def ", help="text to continue, not empty (default: %(default)r)")
    p.add_argument("--tokens", type=int, default=200, metavar="N",
                   help="new tokens to sample, >= 1; prompt + tokens <= model.max_seq_len (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 = greedy: always the likeliest token (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=40, metavar="K",
                   help="sample among the K likeliest tokens; 0 = all (default: %(default)s)")
    return p


def main(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = parser().parse_args(own)
    if args.run_dir and args.config:
        raise UsageError(f"give a run folder ({args.run_dir}) or --config ({args.config}), not both")
    cfg = load_run_config(args.run_dir, overrides) if args.run_dir else load_config(args.config, overrides)
    ckpt = pick_checkpoint(Path(cfg.run.dir), args.checkpoint)
    tok = run_tokenizer(cfg)
    if tok.spec == "pretokenized":      # ids only: their tokenizer is not on this machine (a run from before copies)
        raise ConfigError(f"data.tokenizer: 'pretokenized' shards of tokenizer {tok.ident}, which is neither in "
                          f"{Path(cfg.run.dir) / TOKENIZER_FILE} nor where the shards' manifest.json says; give "
                          "--data.tokenizer hf:/path/tokenizer.json (the one `meshformer prepare` used)")
    resolve_vocab(cfg.model, tok, cfg.data.tokenizer)     # model.vocab_size 0 (auto): as training resolved it
    ids = tok.encode(args.prompt)
    check_request(len(ids), args.tokens, args.temperature, args.top_k, cfg.model.max_seq_len)
    model = Transformer(cfg.model)
    load_model_weights(model, ckpt)
    print(f"meshformer generate: {describe(ckpt)}", file=sys.stderr, flush=True)
    out = generate(model, torch.tensor([ids]), args.tokens, args.temperature, args.top_k,
                   torch.Generator().manual_seed(cfg.run.seed), eot_id=tok.eot_id)[0].tolist()
    if out[-1] == tok.eot_id:        # the end: nothing to print for it (as the exported pipeline does)
        out = out[:-1]
    print(tok.decode(out))
    return 0
