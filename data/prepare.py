"""`meshformer prepare`: text corpora -> tokenized webdataset shards with a manifest.

Each document becomes one sample `<index>.tokens.npy` (uint16 when the vocabulary fits, else
uint32), optionally with its `.txt`. manifest.json lists documents and tokens per shard; the
loader uses it instead of scanning the shards. Tokenizing runs in worker processes (ordered, so
the output does not depend on the worker count); the main process writes the tars.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import sys
from collections import deque
from multiprocessing import get_all_start_methods, get_context

import numpy as np
from webdataset import TarWriter

from core.cli_args import ArgParser
from core.errors import DataError, MeshformerError, UsageError, report_errors

from core.progress import progress as progress_bar
from .textfiles import decompressed, file_format, parquet_texts
from .tokenizer import tokenizer_from_spec

FORMAT = "meshformer-shards/1"
CHUNK_DOCS = 256
VAL_DIR = "val"          # out/val/: the validation split, found by the loader beside out/
VAL_FRACTION = 0.01
_worker_tok = None


def _init_worker(spec: str, eot_token: str):
    global _worker_tok  # one tokenizer per worker process, built once
    _worker_tok = tokenizer_from_spec(spec, eot_token)


def _tokenize_chunk(docs: list[bytes]):
    return [_worker_tok.encode_bytes(d) for d in docs]


def _chunks(docs, size=CHUNK_DOCS):
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tokenize_in_pool(pool, chunks, ahead: int):
    """(chunk, ids) in input order, at most `ahead` chunks in flight (Pool.imap would read all input)."""
    pending: deque = deque()
    for chunk in chunks:
        pending.append((chunk, pool.apply_async(_tokenize_chunk, (chunk,))))
        if len(pending) >= ahead:
            c, r = pending.popleft()
            yield c, r.get()
    while pending:
        c, r = pending.popleft()
        yield c, r.get()


def _npy(arr: np.ndarray) -> bytes:
    f = io.BytesIO()
    np.save(f, arr, allow_pickle=False)
    return f.getvalue()


class ShardWriter:
    """Samples into out_dir/shard-NNNNNN.tar files of about `limit` bytes each, then manifest.json."""

    def __init__(self, out_dir: str, limit: int, dtype, keep_text: bool):
        self.out_dir, self.limit, self.dtype, self.keep_text = out_dir, limit, dtype, keep_text
        self.shards: list[dict] = []
        self.writer, self.size, self.docs = None, 0, 0

    def add(self, text: bytes, ids) -> None:
        if self.writer is None or self.size >= self.limit:
            self.close()
            os.makedirs(self.out_dir, exist_ok=True)
            name = f"shard-{len(self.shards):06d}.tar"
            self.writer = TarWriter(os.path.join(self.out_dir, name))
            self.shards.append({"name": name, "docs": 0, "tokens": 0, "bytes": 0})
            self.size = 0
        sample = {"__key__": f"{self.docs:09d}", "tokens.npy": _npy(np.asarray(ids, dtype=self.dtype))}
        if self.keep_text:
            sample["txt"] = text
        self.writer.write(sample)
        written = sum(len(v) + 1024 for k, v in sample.items() if k != "__key__")
        self.size += written
        self.shards[-1]["docs"] += 1
        self.shards[-1]["tokens"] += len(ids)
        self.shards[-1]["bytes"] += written
        self.docs += 1

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def write_manifest(self, tok) -> dict:
        manifest = {"format": FORMAT, "tokenizer": tok.spec, "tokenizer_ident": tok.ident,
                    "vocab_size": tok.vocab_size, "eot_id": tok.eot_id, "token_field": "tokens.npy",
                    "dtype": np.dtype(self.dtype).name, "docs": self.docs,
                    "tokens": sum(s["tokens"] for s in self.shards), "shards": self.shards}
        tmp = os.path.join(self.out_dir, "manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, os.path.join(self.out_dir, "manifest.json"))
        return manifest


def is_val_doc(index: int, val_fraction: float) -> bool:
    """Document `index` (input order, from 0) goes to the validation split: every round(1/f)-th,
    starting with the first, so a corpus of two or more documents always holds one out (a corpus of
    one keeps it for training: write_shards)."""
    return val_fraction > 0 and index % max(1, round(1 / val_fraction)) == 0


def write_shards(docs, out_dir: str, *, tokenizer: str = "bytes", eot_token: str = "", shard_mb: float = 256.0,
                 workers: int = 1, keep_text: bool = False, progress=None, source: str = "the input",
                 val_fraction: float = 0.0) -> dict:
    """Tokenize `docs` (an iterable of UTF-8 bytes) into out_dir/shard-NNNNNN.tar + manifest.json;
    with val_fraction > 0 every round(1/val_fraction)-th document goes to out_dir/val/ instead (its
    own shards and manifest), where the loader finds it. Returns the manifest (the val one under 'val')."""
    tok = tokenizer_from_spec(tokenizer, eot_token)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    os.makedirs(out_dir, exist_ok=True)
    limit = max(int(shard_mb * 1e6), 1)
    train = ShardWriter(out_dir, limit, dtype, keep_text)
    val = ShardWriter(os.path.join(out_dir, VAL_DIR), limit, dtype, keep_text)
    index = 0
    pool = None
    if workers > 1:
        # fork: workers start in milliseconds (spawn would re-import torch through the data package)
        method = "fork" if "fork" in get_all_start_methods() else "spawn"
        pool = get_context(method).Pool(workers, initializer=_init_worker, initargs=(tokenizer, eot_token))
        tokenized = _tokenize_in_pool(pool, _chunks(docs), ahead=4 * workers)
    else:
        tokenized = ((c, [tok.encode_bytes(d) for d in c]) for c in _chunks(docs))
    pending = None     # the first document (validation's) waits for a second: a corpus of one trains on it
    try:
        for chunk, ids_list in tokenized:
            for text, ids in zip(chunk, ids_list):
                if index == 0 and is_val_doc(0, val_fraction):
                    pending = (text, ids)
                else:
                    if pending is not None:
                        val.add(*pending)
                        pending = None
                    (val if is_val_doc(index, val_fraction) else train).add(text, ids)
                index += 1
                if progress is not None:
                    progress.update(len(text))
        if pending is not None:
            train.add(*pending)
    finally:
        train.close()
        val.close()
        if pool is not None:
            pool.terminate()
    if index == 0:      # no shard was opened: out_dir holds nothing of ours
        raise DataError(f"{source}: no documents (empty files, blank lines, or JSON objects without the "
                        "--text-key field); nothing written")
    manifest = train.write_manifest(tok)
    if val.docs:
        manifest["val"] = val.write_manifest(tok)
    return manifest


def _open_binary(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return decompressed(open(path, "rb"), path) if path.endswith(".zst") else open(path, "rb")


REPLACEMENT = "\ufffd"


def _decode(raw: bytes, path: str, stats: dict) -> str:
    """UTF-8 text of `raw`; invalid bytes become U+FFFD and are counted (a U+FFFD already in the
    input, encoded as EF BF BD, is not counted), so a wrongly encoded corpus does not pass unseen."""
    text = raw.decode("utf-8", errors="replace")
    replaced = text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode())
    if replaced:
        stats["invalid_utf8"] = stats.get("invalid_utf8", 0) + replaced
        stats.setdefault("invalid_utf8_files", []).append(path)
    return text.replace("\r\n", "\n")     # as text-mode reading did (universal newlines)


def iter_input_docs(paths: list[str], fmt: str, text_key: str, stats: dict):
    """Documents (UTF-8 bytes) of the input files: a whole text file, one per JSON line / line, or
    one per Parquet row. stats['read'] counts the input bytes read (for progress)."""
    for path in paths:
        base = stats.setdefault("read", 0)
        yield from _file_docs(path, fmt, text_key, stats, base)
        stats["read"] = base + os.path.getsize(path)


def _file_docs(path: str, fmt: str, text_key: str, stats: dict, base: int):
    plain = not path.endswith((".gz", ".zst"))      # lines of a plain file tell how far it has been read
    kind = fmt
    if kind == "auto":
        found = file_format(path)
        kind = ("jsonl" if found == "jsonl" or path.removesuffix(".gz").endswith(".json")
                else "parquet" if found == "parquet" else "text")
    if kind == "parquet":
        for text in parquet_texts(path, text_key, stats):
            yield _decode(text, path, stats).encode("utf-8")
        return
    with _open_binary(path) as f:
        if kind == "text":
            text = _decode(f.read(), path, stats)
            if text.strip():
                yield text.encode("utf-8")
            return
        if kind == "jsonl" and _starts_with_bracket(f):  # a JSON array of objects
            try:
                items = json.loads(_decode(f.read(), path, stats))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from e
            for obj in items:
                if isinstance(obj, dict) and isinstance(obj.get(text_key), str):
                    yield obj[text_key].encode("utf-8")
                else:
                    stats["missing"] = stats.get("missing", 0) + 1
            return
        for lineno, raw in enumerate(f, 1):
            if plain:
                base += len(raw)
                stats["read"] = base
            line = _decode(raw, path, stats)
            if not line.strip():
                continue
            if kind == "lines":
                yield line.rstrip("\n").encode("utf-8")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e}); use --format text for plain text") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                stats["missing"] = stats.get("missing", 0) + 1
                continue
            yield obj[text_key].encode("utf-8")


def _counted(docs, stats: dict, bar):
    """The documents, moving the progress bar by the input bytes read for them (stats['read'])."""
    shown = 0
    for doc in docs:
        yield doc
        bar.update(stats["read"] - shown)
        shown = stats["read"]
    bar.update(stats.get("read", 0) - shown)


def _starts_with_bracket(f) -> bool:
    if not f.seekable():      # a .zst stream: look without consuming
        return f.peek(4096)[:4096].lstrip().startswith(b"[")
    head = f.read(4096).lstrip()
    f.seek(0)
    return head.startswith(b"[")


def expand_inputs(inputs: list[str]) -> list[str]:
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(p for p in glob.glob(os.path.join(item, "**", "*"), recursive=True) if os.path.isfile(p))
        else:
            found = sorted(glob.glob(item)) if any(c in item for c in "*?[") else [item]
        for p in found:
            if not os.path.isfile(p):
                raise UsageError(f"input {p!r} not found; give text/JSON-lines files, folders or globs")
        if not found:
            raise UsageError(f"input {item!r} matches no files")
        paths += found
    if not paths:
        raise UsageError(f"no input files in {inputs}")
    return paths


def main(argv: list[str] | None = None, debug: bool = False) -> int:
    return report_errors("meshformer prepare", lambda: _main(argv), debug)


def _main(argv: list[str] | None) -> int:
    ap = ArgParser(prog="meshformer prepare", description="Turn text corpora (plain text, JSON "
                                 "lines, JSON arrays, Parquet) into tokenized webdataset shards with a manifest, "
                                 "holding out a validation split.")
    ap.add_argument("inputs", nargs="+", help="text, JSON-lines (.gz/.zst ok) or Parquet files, folders, or globs")
    ap.add_argument("--out", required=True, help="output folder for shard-NNNNNN.tar and manifest.json (must be "
                    "empty or new)")
    ap.add_argument("--tokenizer", default="bytes", help="bytes | hf:/path/tokenizer.json | tiktoken:<encoding>")
    ap.add_argument("--eot-token", default="", help="end-of-text token of an hf: tokenizer (default: auto)")
    ap.add_argument("--format", default="auto", choices=["auto", "text", "jsonl", "lines"],
                    help="auto: *.jsonl/*.json(.gz/.zst) are JSON lines, *.parquet Parquet, others one document "
                         "per file")
    ap.add_argument("--text-key", default="text", help="JSON field / Parquet column holding the text")
    ap.add_argument("--shard-size-mb", type=float, default=256.0, help="target shard size in MB")
    ap.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                    help="tokenizer processes")
    ap.add_argument("--keep-text", action="store_true", help="also store each document's text as .txt")
    ap.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                    help="hold out every round(1/F)-th document (the 1st, 1+1/F-th, ...: at least one of two or "
                         "more) as the validation split in OUT/val/, which training evaluates on (0 = none)")
    args = ap.parse_args(argv)
    paths = expand_inputs(args.inputs)
    if not args.shard_size_mb > 0:
        raise UsageError(f"--shard-size-mb: {args.shard_size_mb} must be > 0 (MB per shard)")
    if args.workers < 1:
        raise UsageError(f"--workers: {args.workers} must be >= 1")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a new or empty folder")
    if os.path.isdir(args.out) and os.listdir(args.out):
        raise UsageError(f"--out {args.out} is not empty; choose a new folder (nothing is overwritten)")
    tokenizer_from_spec(args.tokenizer, args.eot_token)  # fail early on a bad tokenizer
    if not 0 <= args.val_fraction <= 0.5:
        raise UsageError(f"--val-fraction: {args.val_fraction} must be in [0, 0.5] (0 = no validation split)")
    stats: dict = {}
    total = sum(os.path.getsize(p) for p in paths)
    created = not os.path.exists(args.out)
    try:
        with progress_bar(total, "prepare", "B", unit_scale=True) as bar:
            manifest = write_shards(_counted(iter_input_docs(paths, args.format, args.text_key, stats), stats, bar),
                                    args.out,
                                    tokenizer=args.tokenizer, eot_token=args.eot_token, shard_mb=args.shard_size_mb,
                                    workers=args.workers, keep_text=args.keep_text,
                                    source=" ".join(args.inputs), val_fraction=args.val_fraction)
    except MeshformerError:
        if created and os.path.isdir(args.out) and not os.listdir(args.out):
            os.rmdir(args.out)     # leave no empty folder that a second try would call "not empty"
        raise
    print(f"wrote {len(manifest['shards'])} shards, {manifest['docs']} documents, {manifest['tokens']} tokens "
          f"to {args.out}")
    val = manifest.get("val")
    if val:
        docs = f"{val['docs']} document" + ("s" if val["docs"] > 1 else "")
        print(f"held out {docs}, {val['tokens']} tokens for validation in "
              f"{os.path.join(args.out, VAL_DIR)} (--val-fraction {args.val_fraction}; training finds it there)")
    else:
        why = "--val-fraction 0" if args.val_fraction == 0 else "one document is too few to hold one out"
        print(f"no validation split ({why}): give the run data.val_urls, or it trains without evaluation")
    missing = stats.get("missing", 0) + stats.get("missing_field", 0)
    if missing:
        print(f"skipped {missing} JSON lines / Parquet rows without a string field {args.text_key!r}", file=sys.stderr)
    if stats.get("invalid_utf8"):
        files = stats["invalid_utf8_files"]
        print(f"replaced {stats['invalid_utf8']} invalid UTF-8 sequences with U+FFFD in {len(set(files))} "
              f"input files (first: {files[0]}); check the corpus encoding", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
