"""Raw text files as sources: plain text, JSON lines (.jsonl, .jsonl.gz, .jsonl.zst) and Parquet.

How FineWeb, DCLM and most web-scale corpora ship. Each file is read as a stream of documents
(UTF-8 bytes) in file order, deterministically, so the loader treats a file like a tar shard: it
is indexed once (documents and tokens, cached), cut into token positions, split over DP ranks and
loader workers, and resumed exactly by position. Decoding is the libraries' (gzip, zstandard,
pyarrow); a Parquet file is streamed by record batch, reading only the text column.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import logging
import os

from core.errors import DataError

from .shards import is_local, local_path, note_damage, open_shard

log = logging.getLogger("meshformer.data")

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TEXT_SUFFIXES = (".txt", ".txt.gz", ".txt.zst", ".md")
JSONL_SUFFIXES = tuple(s + c for s in (".jsonl", ".ndjson") for c in ("", ".gz", ".zst"))
PARQUET_SUFFIXES = (".parquet",)
ACCEPTED = ("tar shards (.tar, .tar.gz, .tgz), text (.txt, .txt.gz, .txt.zst, .md: one document per file), "
            "JSON lines (.jsonl, .jsonl.gz, .jsonl.zst: one document per line, field data.text_key), "
            "Parquet (.parquet: column data.text_key)")
PARQUET_BATCH_ROWS = 1024   # rows decoded at a time: a row group is streamed, never loaded whole


def file_format(url: str) -> str | None:
    """'tar', 'text', 'jsonl' or 'parquet' from the file name (also inside a pipe: command), else None."""
    name = url.rstrip().rstrip("-").rstrip().lower()
    if url.startswith("pipe:"):   # 'pipe:aws s3 cp s3://b/x.jsonl.zst -': the name is the last path-like word
        words = [w for w in name.split() if "." in w]
        name = words[-1] if words else name
    for fmt, suffixes in (("tar", TAR_SUFFIXES), ("jsonl", JSONL_SUFFIXES), ("parquet", PARQUET_SUFFIXES),
                          ("text", TEXT_SUFFIXES)):
        if name.endswith(suffixes):
            return fmt
    return None


def optional_module(name: str, url: str):
    """pyarrow / zstandard: the `data` extra, needed only by the sources that use them."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise DataError(f"reading {url} needs the {name.split('.')[0]} package: pip install 'meshformer[data]'") from None


def unknown_file(url: str, where: str = "data.urls") -> DataError:
    return DataError(f"{where}: cannot read {url}: unknown file type; accepted: {ACCEPTED}; "
                     "or convert it with `meshformer prepare`")


class ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a .zst stream, frame after frame, through zstandard's decompressobj.
    zstandard's stream_reader ends silently where a truncated file ends inside a frame; this raises
    ZstdError there, so a cut download is reported (data.on_corrupt), not read as a shorter corpus."""

    def __init__(self, source, zstandard):
        self.source, self.zstd = source, zstandard
        self.obj, self.fed = zstandard.ZstdDecompressor().decompressobj(), False
        self.buf, self.pos = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.pos >= len(self.buf):
            chunk = self.source.read(1 << 16)
            if not chunk:
                if self.fed and not self.obj.eof:
                    raise self.zstd.ZstdError("the file ends inside a zstd frame (truncated)")
                return 0
            self.buf, self.pos = self._decompress(chunk), 0
        n = min(len(b), len(self.buf) - self.pos)
        b[:n] = self.buf[self.pos:self.pos + n]
        self.pos += n
        return n

    def _decompress(self, data: bytes) -> bytes:
        out = []
        while data:
            if self.obj.eof:     # the next frame (pzstd and concatenated files have several)
                self.obj = self.zstd.ZstdDecompressor().decompressobj()
            self.fed = True
            out.append(self.obj.decompress(data))
            data = self.obj.unused_data if self.obj.eof else b""
        return b"".join(out)


def decompressed(stream, url: str):
    """A binary stream of the file's decompressed bytes (by its suffix)."""
    name = url.lower()
    if name.endswith(".gz"):
        return gzip.GzipFile(fileobj=stream)
    if name.endswith(".zst"):
        return io.BufferedReader(ZstdFrames(stream, optional_module("zstandard", url)), buffer_size=1 << 16)
    return stream


def _damage_errors(url: str) -> tuple:
    """The exceptions a damaged compressed file raises while read (gzip: OSError/EOFError)."""
    if url.lower().endswith(".zst"):
        return (OSError, EOFError, optional_module("zstandard", url).ZstdError)
    return (OSError, EOFError)


def _text_of(record, text_key: str):
    value = record.get(text_key) if isinstance(record, dict) else None
    return value if isinstance(value, str) else None


def _jsonl_texts(f, url: str, text_key: str, stats: dict):
    warned = False
    for lineno, raw in enumerate(f, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{url}:{lineno}: not a JSON line ({e}); JSON lines files hold one object per line "
                            "(plain text: name it .txt)") from None
        text = _text_of(record, text_key)
        if text is None:
            stats["missing_field"] = stats.get("missing_field", 0) + 1
            if not warned:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                log.warning("%s:%d has no string field %r (it has %s); skipping such lines (set data.text_key)",
                            url, lineno, text_key, keys)
                warned = True
            continue
        yield text.encode("utf-8")


def parquet_texts(url: str, text_key: str, stats: dict):
    pa = optional_module("pyarrow", url)
    pq = optional_module("pyarrow.parquet", url)
    path = local_path(url)
    if not is_local(path):
        raise DataError(f"data.urls: {url}: Parquet is read from local files only (it needs seeking); copy it "
                        "here, or convert it with `meshformer prepare`")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"cannot read {url} as Parquet: {e}") from None
    columns = pf.schema_arrow.names
    if text_key not in columns:
        raise DataError(f"{url}: Parquet file has no column {text_key!r} (it has {columns}); set data.text_key "
                        "(prepare: --text-key)")
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_key]):
        for text in batch.column(0).to_pylist():
            if isinstance(text, str):
                yield text.encode("utf-8")
            else:                     # null or not a string
                stats["missing_field"] = stats.get("missing_field", 0) + 1


def iter_texts(url: str, fmt: str, *, text_key: str, on_corrupt: str, stats: dict):
    """Yield the documents (UTF-8 bytes) of one raw file, in order. A truncated or damaged
    compressed stream keeps the documents before the damage (on_corrupt='skip') or raises."""
    if fmt == "parquet":
        yield from parquet_texts(url, text_key, stats)
        return
    stream = open_shard(url)
    try:
        f = decompressed(stream, url)
        try:
            if fmt == "text":
                data = f.read()
                if data.strip():
                    yield data
            else:
                yield from _jsonl_texts(f, url, text_key, stats)
        except _damage_errors(url) as e:    # gzip / zstd errors, a truncated file
            note_damage("data file", url, e, on_corrupt, stats)
    finally:
        try:
            stream.close()
        except Exception as e:
            raise DataError(f"cannot read data file {url}: {e}") from None


def looks_like_shard_list(path: str) -> bool:
    """A .txt in data.urls is a shard list when every entry line names a data file or a pipe: command
    (else it is a text document). Big files are documents."""
    if os.path.getsize(path) > 1 << 20:
        return False
    try:
        with open(path, encoding="utf-8") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.strip().startswith("#")]
    except UnicodeDecodeError:
        return False
    return bool(lines) and all(ln.startswith("pipe:") or file_format(ln) is not None for ln in lines)
