"""Sample text from a model with a KV cache: a quick look at what a checkpoint learned.

    meshformer generate runs/tiny --prompt "def "                  # the run folder is enough
    meshformer generate runs/tiny --checkpoint step-400 --temperature 0
    meshformer generate --config configs/tiny.toml [--section.key value ...]
    meshformer generate runs/big --draft runs/small --draft-tokens 4    # speculative decoding
    meshformer generate runs/tiny --quantize int8 --bench                # tokens/s, bandwidth share
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from core.cli_args import ArgParser, at_least, split_overrides
from core.errors import ConfigError, UsageError
from core.run_config import keys_help, load_config
from trainer.checkpoint import load_model_weights
from trainer.decode_bench import format_bench, run_bench
from trainer.inference_weights import DTYPES, QUANTIZE, prepare_weights
from trainer.model import KVCache, Transformer
from trainer.run_folder import TOKENIZER_FILE, describe, load_run_config, pick_checkpoint, run_tokenizer
from trainer.speculative import check_same_vocab, speculative_generate
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
    if model.cfg.doc_mask and bool((prompt == model.cfg.eot_id).any()):
        # the cache decodes one document (positions from 0, no document ids): what follows an
        # end-of-text would be a new document, which a doc_mask model never saw attend across one
        raise UsageError(f"--prompt: holds end-of-text (id {model.cfg.eot_id}); a model.doc_mask "
                         "model sees one document at a time: give the text of the document to continue")
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
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="weights and activations (default: %(default)s)")
    p.add_argument("--quantize", choices=list(QUANTIZE), default="none",
                   help="weight-only quantization of the Linear layers through torchao (default: %(default)s)")
    p.add_argument("--draft", metavar="DRAFT_RUN_DIR", default=None,
                   help="speculative decoding: a smaller run with the same tokenizer proposes tokens; prints the "
                        "acceptance rate and the speed-up over plain decoding timed in the same run (default: none)")
    p.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="tokens the draft proposes per target pass, >= 1 (default: %(default)s)")
    p.add_argument("--bench", action="store_true",
                   help="instead of text: decode tokens/s and the share of the memory bandwidth read, for fp32, "
                        "bf16 and int8 weights at each --batch-sizes (and speculative with --draft); --dtype and --quantize "
                        "are not used: every variant is measured (default: off)")
    p.add_argument("--batch-sizes", default="1,8", metavar="B,B",
                   help="--bench: rows decoded at once (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="--bench: print the rows as JSON (default: off)")
    return p


def open_run(run_dir: str | None, config: str | None, checkpoint: str | None, overrides: list[str]):
    """(config, tokenizer, checkpoint folder) of a run folder or a --config; no weights read yet,
    so a bad request is refused before seconds of loading."""
    if run_dir and config:
        raise UsageError(f"give a run folder ({run_dir}) or --config ({config}), not both")
    cfg = load_run_config(run_dir, overrides) if run_dir else load_config(config, overrides)
    ckpt = pick_checkpoint(Path(cfg.run.dir), checkpoint)
    tok = run_tokenizer(cfg)
    if tok.spec == "pretokenized":      # ids only: their tokenizer is not on this machine (a run from before copies)
        raise ConfigError(f"data.tokenizer: 'pretokenized' shards of tokenizer {tok.ident}, which is neither in "
                          f"{Path(cfg.run.dir) / TOKENIZER_FILE} nor where the shards' manifest.json says; give "
                          "--data.tokenizer hf:/path/tokenizer.json (the one `meshformer prepare` used)")
    resolve_vocab(cfg.model, tok, cfg.data.tokenizer)     # model.vocab_size 0 (auto): as training resolved it
    return cfg, tok, ckpt


def load_weights(cfg, ckpt: Path, prog: str = "meshformer generate") -> Transformer:
    """The fp32 model with the checkpoint's weights; the checkpoint used is printed on stderr."""
    if cfg.train.threads:         # the run's CPU threads (--train.threads N overrides), as training uses
        torch.set_num_threads(cfg.train.threads)
    model = Transformer(cfg.model)
    load_model_weights(model, ckpt)
    print(f"{prog}: {describe(ckpt)}", file=sys.stderr, flush=True)
    return model


def load_model(run_dir: str | None, config: str | None = None, checkpoint: str | None = None,
               overrides: list[str] = (), prog: str = "meshformer generate"):
    """(config, tokenizer, fp32 model) of a run folder or a --config."""
    cfg, tok, ckpt = open_run(run_dir, config, checkpoint, list(overrides))
    return cfg, tok, load_weights(cfg, ckpt, prog)


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(b) for b in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise UsageError(f"--batch-sizes: {text!r}; give rows decoded at once, >= 1, comma separated, e.g. 1,8")
    return sizes


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def speculative_main(args, model, draft, ids: list[int], seed: int, eot_id: int | None) -> list[int]:
    """Speculative decoding, and plain decoding of the same request timed beside it for the speed-up."""
    prompt = torch.tensor([ids])
    plain, t_plain = timed(lambda: generate(model, prompt, args.tokens, args.temperature, args.top_k,
                                            torch.Generator().manual_seed(seed), eot_id=eot_id))
    (out, stats), t_spec = timed(lambda: speculative_generate(
        model, draft, prompt, args.tokens, args.draft_tokens, args.temperature, args.top_k,
        torch.Generator().manual_seed(seed), eot_id=eot_id))
    speed_plain = (plain.shape[1] - len(ids)) / t_plain
    speed_spec = stats.emitted / t_spec
    same = " (identical to plain greedy)" if args.temperature <= 0 and torch.equal(out, plain) else ""
    print(f"meshformer generate: speculative k={args.draft_tokens}: acceptance rate {stats.acceptance_rate:.2f} "
          f"({stats.accepted}/{stats.drafted} draft tokens), {stats.tokens_per_target_pass:.2f} tokens per target "
          f"pass; {speed_spec:.0f} tokens/s vs plain {speed_plain:.0f} tokens/s: speed-up "
          f"{speed_spec / speed_plain:.2f}x{same}", file=sys.stderr, flush=True)
    return out[0].tolist()


def main(argv: list[str]) -> int:
    own, overrides = split_overrides(argv)
    args = parser().parse_args(own)
    at_least("--draft-tokens", args.draft_tokens, 1, "tokens the draft proposes per round")
    sizes = batch_sizes(args.batch_sizes)
    cfg, tok, ckpt = open_run(args.run_dir, args.config, args.checkpoint, overrides)
    ids = tok.encode(args.prompt)
    check_request(len(ids), args.tokens, args.temperature, args.top_k, cfg.model.max_seq_len)
    if args.draft:
        dcfg, dtok, dckpt = open_run(args.draft, None, None, [])
        check_same_vocab(cfg.model.vocab_size, dcfg.model.vocab_size, tok.ident, dtok.ident)
        limit = dcfg.model.max_seq_len
        if len(ids) + args.tokens > limit:
            raise UsageError(f"--tokens: {args.tokens} after a {len(ids)}-token prompt exceed the draft's "
                             f"model.max_seq_len={limit}; give at most {limit - len(ids)}")
    model = load_weights(cfg, ckpt)
    draft = load_weights(dcfg, dckpt) if args.draft else None
    if args.bench:    # each variant quantizes its own copy of the fp32 weights
        result = run_bench(model, ids, args.tokens, sizes, draft, args.draft_tokens)
        print(json.dumps(result, indent=1) if args.json else format_bench(result))
        return 0
    prepare_weights(model, args.dtype, args.quantize)
    if draft is not None:
        prepare_weights(draft, args.dtype)
        out = speculative_main(args, model, draft, ids, cfg.run.seed, tok.eot_id)
    else:
        out = generate(model, torch.tensor([ids]), args.tokens, args.temperature, args.top_k,
                       torch.Generator().manual_seed(cfg.run.seed), eot_id=tok.eot_id)[0].tolist()
    if out[-1] == tok.eot_id:        # the end: nothing to print for it (as the exported pipeline does)
        out = out[:-1]
    print(tok.decode(out))
    return 0
