"""Read one tar shard as a stream of documents (numpy token arrays), using webdataset's tar iterators.

Opening goes through webdataset's `gopen`, so a shard URL may be a local path, `file:`, `pipe:CMD`
or anything else gopen knows. A missing or unreadable shard is always an error naming it; a
truncated or corrupt tar keeps its readable documents and is counted and logged (on_corrupt='skip')
or raises (on_corrupt='error'). Reading is deterministic, so a shard read twice yields the same
documents, even when it is corrupt: the shard index and the loader agree on its length.
"""

from __future__ import annotations

import io
import logging
import os
import re

import numpy as np
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import group_by_keys, tar_file_iterator

from core.errors import DataError, ShardDamageError

log = logging.getLogger("meshformer.data")


def note_damage(what: str, url: str, e: BaseException, on_corrupt: str, stats: dict) -> None:
    """A damaged shard or data file: stop, naming it (data.on_corrupt = 'error'), or count it and go
    on with the documents read before the damage ('skip')."""
    if on_corrupt == "error":
        raise DataError(f"corrupt or truncated {what} {url}: {e} "
                        "(set data.on_corrupt='skip' to keep its readable documents)") from e
    stats["corrupt_shards"] = stats.get("corrupt_shards", 0) + 1
    log.warning("corrupt or truncated %s %s: %s; kept the documents before the damage", what, url, e)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and not url.startswith("builtin:")


def local_path(url: str) -> str:
    return url[len("file:"):] if url.startswith("file:") else url


def open_shard(url: str):
    path = local_path(url)
    if is_local(path) and not os.path.isfile(path):
        raise DataError(f"data shard not found: {url} (check data.urls / the shard-list file)")
    try:
        return gopen(url, "rb")
    except Exception as e:
        raise DataError(f"cannot open data shard {url}: {e}") from e


def _pipe_failure(stream, url: str):
    """A pipe: command that failed is an unreadable URL, not a corrupt tar."""
    if hasattr(stream, "wait_for_child"):
        try:
            stream.wait_for_child()
        except Exception as e:
            return DataError(f"cannot read data shard {url}: the command failed ({e})")
    return None


def iter_samples(url: str, on_corrupt: str, stats: dict):
    """Yield webdataset samples (dicts of field -> bytes) of one shard."""
    stream = open_shard(url)
    read_to_end = False
    try:
        def files():
            for f in tar_file_iterator(stream, handler=reraise_exception):
                f["__url__"] = url
                yield f

        yield from group_by_keys(files(), handler=reraise_exception)
        read_to_end = True
    except DataError:
        raise
    except Exception as e:  # tarfile.ReadError, EOFError, zlib errors, duplicate names ...
        read_to_end = True
        failure = _pipe_failure(stream, url)
        if failure is not None:
            raise failure from e
        note_damage("data shard", url, e, on_corrupt, stats)
    finally:
        _close(stream, url, check=read_to_end)


def _close(stream, url: str, check: bool):
    """Close a shard stream. A reader that stopped early (its slot ended mid-shard) stops a pipe:
    command too, and that command's exit status (killed by SIGPIPE) is no error."""
    proc = getattr(stream, "proc", None)
    if not check and proc is not None:
        proc.kill()
    try:
        stream.close()
    except Exception as e:
        if check:
            raise DataError(f"cannot read data shard {url}: {e}") from e


def decode_tokens(data: bytes, vocab_size: int, url: str, key, field: str = "tokens.npy") -> np.ndarray:
    """A document's token ids, checked: an undecodable array or an id outside the vocabulary (a
    damaged or foreign shard) would otherwise crash the embedding lookup far from its cause.
    One max() per document: vectorised, no per-token work in Python."""
    try:
        ids = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:           # ValueError, EOFError, ... from a garbled .npy header or body
        reason = str(e).split(".")[0]     # numpy's advice to load pickles unsafely is not ours to give
        raise ShardDamageError(f"data shard {url}: sample {key!r} field {field!r} is not a readable token array "
                               f"({reason}); the shard is damaged: restore it or prepare it again") from e
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ShardDamageError(f"data shard {url}: sample {key!r} holds a {ids.dtype} array of shape {ids.shape}, "
                               "not a 1-d array of integer token ids; restore the shard or prepare it again")
    if ids.size:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (vocab_size is not None and high >= vocab_size):
            bad = low if low < 0 else high
            raise ShardDamageError(f"data shard {url}: sample {key!r} has token id {bad}, outside the tokenizer's "
                                   f"vocabulary of {vocab_size} ids (0..{(vocab_size or 1) - 1}); the shard is "
                                   "damaged or was prepared with another tokenizer")
    return ids


def iter_documents(url: str, *, mode: str, field: str, tokenizer, on_corrupt: str, stats: dict,
                   vocab_size: int | None = None):
    """Yield each document's token ids (without end-of-text) in shard order.

    mode 'text': tokenize sample[field] (UTF-8 bytes); mode 'tokens': sample[field] is an .npy array.
    Samples without the field are skipped, counted in stats['missing_field'] and logged once per shard.
    Token ids must lie below `vocab_size` (the shard's manifest's; default the tokenizer's).
    """
    vocab_size = vocab_size or getattr(tokenizer, "vocab_size", None)
    warned = False
    for sample in iter_samples(url, on_corrupt, stats):
        data = sample.get(field)
        if data is None:
            stats["missing_field"] = stats.get("missing_field", 0) + 1
            if not warned:
                fields = sorted(k for k in sample if not k.startswith("__"))
                log.warning("data shard %s: sample %r has no field %r (it has %s); skipping such samples "
                            "(set data.text_field / data.token_field)", url, sample.get("__key__"), field, fields)
                warned = True
            continue
        if mode == "tokens":
            yield decode_tokens(data, vocab_size, url, sample.get("__key__"), field)
        else:
            yield tokenizer.encode_bytes(data)


def shard_name(url: str) -> str:
    """The shard's file name, also inside a command: 'pipe:aws s3 cp s3://b/x/shard-000001.tar -'."""
    found = re.findall(r"[^\s/'\"]+\.(?:tar\.gz|tgz|tar)\b", url)
    return found[-1] if found else os.path.basename(local_path(url))
