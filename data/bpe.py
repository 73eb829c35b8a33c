"""Train a small byte-level BPE tokenizer on the built-in corpus's TRAIN split (never on validation).

Byte tokens make Python source very skewed (a space is ~30% of tokens), which hurts small models and
MoE routing alike; a few hundred merges turn indentation runs, keywords and common names into single
tokens. The result is a Hugging Face tokenizer.json with `<|endoftext|>` that `data.tokenizer =
"hf:PATH"` loads. Training is deterministic for one input (files read sorted, one thread's worth of
ties broken by the library's pair order), so the shipped file can be rebuilt:

    python -m data.bpe --vocab 1024 --out configs/tokenizers/stdlib-bpe-1k.json
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from core.errors import UsageError

from .builtin import is_val, stdlib_files

EOT = "<|endoftext|>"


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-splitting, no prefix space) with `vocab_size` ids including EOT.

    The 256 byte symbols are all in the vocabulary, so any text encodes and round-trips.
    """
    if vocab_size < 256 + 1:
        raise UsageError(f"--vocab {vocab_size}: a byte-level BPE needs at least 257 ids (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def stdlib_train_texts(val_percent: float) -> list[str]:
    """The built-in corpus's training files (data.builtin's split), in sorted path order."""
    root, files = stdlib_files()
    out = []
    for p in files:
        if not is_val(p, val_percent):
            with open(os.path.join(root, p), "rb") as f:
                out.append(f.read().decode("utf-8", errors="replace"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.bpe", description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=1024, help="ids in all, including <|endoftext|>")
    ap.add_argument("--out", required=True, help="tokenizer.json to write")
    ap.add_argument("--val-percent", type=float, default=5.0,
                    help="data.builtin_val_percent of the runs that will use it (those files are left out)")
    args = ap.parse_args(argv)
    try:
        tok = train_bpe(stdlib_train_texts(args.val_percent), args.vocab)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tok.save(args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size(with_added_tokens=True)} ids, {EOT} = {tok.token_to_id(EOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
