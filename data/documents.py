"""One source file -> its documents as token ids, whatever its format (tar shard or raw text file)."""

from __future__ import annotations

from .shards import iter_documents as tar_documents
from .textfiles import iter_texts


def iter_documents(url: str, *, fmt: str = "tar", mode: str, field: str, tokenizer, on_corrupt: str, stats: dict,
                   vocab_size: int | None = None):
    """Each document's token ids (without end-of-text) in file order. For a raw file (fmt 'text',
    'jsonl', 'parquet') `field` is the JSON / Parquet field holding the text, tokenized here."""
    if fmt == "tar":
        yield from tar_documents(url, mode=mode, field=field, tokenizer=tokenizer, on_corrupt=on_corrupt,
                                 stats=stats, vocab_size=vocab_size)
        return
    for data in iter_texts(url, fmt, text_key=field, on_corrupt=on_corrupt, stats=stats):
        yield tokenizer.encode_bytes(data)


def scan_source(url: str, *, fmt: str, mode: str, field: str, tokenizer, on_corrupt: str) -> dict:
    """Count documents and tokens of one file (for files without a manifest)."""
    stats: dict = {}
    docs = tokens = 0
    for ids in iter_documents(url, fmt=fmt, mode=mode, field=field, tokenizer=tokenizer, on_corrupt=on_corrupt,
                              stats=stats):
        docs += 1
        tokens += len(ids)
    return {"url": url, "docs": docs, "tokens": tokens, "missing_field": stats.get("missing_field", 0),
            "corrupt": stats.get("corrupt_shards", 0)}
