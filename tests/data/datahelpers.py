"""Tiny shard writers and batch readers for the data tests.

Two kinds of corpus:
- "unique tokens": pre-tokenized shards whose every token id occurs once in the whole corpus
  (end-of-text is 0), so any repeat or skip of a document, or a part of one, is visible;
- "text": UTF-8 documents with a unique name, read with the byte tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import random

import numpy as np
from webdataset import TarWriter


EOT = 0


def write_unique_token_shards(folder, n_shards=6, docs_per_shard=9, max_len=40, seed=0, first=1, manifest=True):
    """Shards of documents with consecutive unique ids; returns (urls, all real token ids)."""
    os.makedirs(folder, exist_ok=True)
    rng = random.Random(seed)
    nxt, urls, entries = first, [], []
    for s in range(n_shards):
        name = f"shard-{s:06d}.tar"
        path = os.path.join(folder, name)
        tokens = 0
        with TarWriter(path) as w:
            for d in range(docs_per_shard):
                n = rng.randint(1, max_len)
                ids = np.arange(nxt, nxt + n, dtype=np.uint32)
                nxt += n
                tokens += n
                buf = io.BytesIO()
                np.save(buf, ids)
                w.write({"__key__": f"{s:03d}{d:05d}", "tokens.npy": buf.getvalue()})
        urls.append(path)
        entries.append({"name": name, "docs": docs_per_shard, "tokens": tokens})
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"format": "meshformer-shards/1", "tokenizer": "test-ids", "tokenizer_ident": "test-ids",
                       "vocab_size": nxt, "eot_id": EOT, "token_field": "tokens.npy", "shards": entries}, f)
    return urls, list(range(first, nxt))


def text_docs(n, seed=0, max_len=300):
    rng = random.Random(seed)
    letters = "abcdefghij klmnop\n"
    return [f"<doc {i:05d}>" + "".join(rng.choice(letters) for _ in range(rng.randint(0, max_len)))
            for i in range(n)]


def write_text_shards(folder, docs, per_shard=10, field="txt"):
    os.makedirs(folder, exist_ok=True)
    urls = []
    for s in range(0, len(docs), per_shard):
        path = os.path.join(folder, f"text-{s // per_shard:04d}.tar")
        with TarWriter(path) as w:
            for i, d in enumerate(docs[s:s + per_shard]):
                w.write({"__key__": f"d{s + i:06d}", field: d.encode()})
        urls.append(path)
    return urls


def real_tokens(batches):
    """All real (not padding, not end-of-text) token ids in a list of (inputs, labels) batches."""
    out = []
    for x, y in batches:
        x, y = x.numpy(), y.numpy()
        # a row's tokens are its first input then its labels; padding reads as EOT / -100
        out += x[:, 0].tolist() + y[y != -100].ravel().tolist()
    return [t for t in out if t != EOT]


def slot_stream(batches, eot):
    """The token streams of the batches' rows, padding dropped: row i of the batches reads one lane,
    so this gives the lanes of those rows end to end, in row order."""
    out = []
    rows = batches[0][0].shape[0] if batches else 0
    for i in range(rows):
        for x, y in batches:
            xr, yr = x[i].tolist(), y[i].tolist()
            if not (yr[0] == -100 and xr[0] == eot):
                out.append(xr[0])
            out += [t for t in yr if t != -100]
    return out


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def train_bpe_tokenizer(path, vocab_size=300, text=None):
    """A byte-level BPE tokenizer.json trained here on a few KB of text (no download), with
    <|endoftext|> as its end-of-text token; returns the path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(text or text_docs(60, seed=1), trainer=trainer)
    tok.save(str(path))
    return str(path)
