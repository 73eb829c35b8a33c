"""Streamed data: webdataset shards or raw text (.txt, JSON lines, Parquet) -> tokens -> packed
(inputs, labels) batches, exactly resumable.

    tok = build_tokenizer(cfg)
    train = build_loader(cfg, split="train", seq_len=128, batch_size=16, dp_rank=r, dp_size=d, seed=0,
                         grad_accum=a)          # a micro-batches of 16 per optimizer step
    for inputs, labels in train: ...; state = train.state_dict()   # same dict on every DP rank
    val = build_loader(cfg, split="val", ...)   # None when there is no validation data

See data/README.md for URLs, resume semantics and `meshformer prepare`.
"""

from __future__ import annotations

import os

from core.data_config import BUILTIN_PREFIX, DataConfig
from .loader import TokenLoader, ValLoader
from .plan import IGNORE, data_fingerprint
from .prepare import VAL_DIR
from .shards import DataError, is_local, local_path
from .sources import build_sources, build_tokenizer, source_stats

__all__ = ["DataConfig", "DataError", "IGNORE", "build_loader", "build_tokenizer", "val_entries"]


def val_entries(cfg: DataConfig) -> list[str]:
    """The validation URL entries: data.val_urls, else the built-in corpus' validation split, else the
    val/ split `meshformer prepare` wrote inside the urls folders."""
    if cfg.val_urls:
        return list(cfg.val_urls)
    builtin = [u for u in cfg.urls if u.startswith(BUILTIN_PREFIX)][:1]
    if builtin:
        return builtin
    folders = [local_path(u) for u in cfg.urls if is_local(local_path(u)) and os.path.isdir(local_path(u))]
    return [os.path.join(f, VAL_DIR) for f in folders if os.path.isfile(os.path.join(f, VAL_DIR, "manifest.json"))]


def build_loader(cfg: DataConfig, *, split: str, seq_len: int, batch_size: int, dp_rank: int, dp_size: int,
                 seed: int, tokenizer=None, grad_accum: int = 1):
    """The loader of one data-parallel rank (dp_rank is the DP coordinate, never the global rank).

    It yields micro-batches of `batch_size` rows, `grad_accum` per optimizer step. Which sequences
    form a step depends only on the global batch dp_size * grad_accum * batch_size (and data, seed,
    seq_len), not on how it is split into ranks, accumulation and loader workers.

    split='train': endless, shuffled per epoch, with state_dict()/load_state_dict().
    split='val': a finite deterministic pass (same batches each time); None if there is no validation data.
    Labels are inputs shifted by one; positions with no token (an epoch's last, padded batch) have label IGNORE.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split {split!r} must be 'train' or 'val'")
    cfg.validate()
    tok = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    if split == "val":
        entries = val_entries(cfg)
        if not entries:
            return None
        sources = build_sources(entries, [], cfg, "val", tok)
        return ValLoader(sources=sources, cfg=cfg, tokenizer=tok, seq_len=seq_len, batch_size=batch_size,
                         dp_rank=dp_rank, dp_size=dp_size, stats=source_stats(sources), grad_accum=grad_accum)
    sources = build_sources(cfg.urls, cfg.weights, cfg, "train", tok)
    return TokenLoader(sources=sources, cfg=cfg, tokenizer=tok, seq_len=seq_len, batch_size=batch_size,
                       dp_rank=dp_rank, dp_size=dp_size, seed=seed, stats=source_stats(sources),
                       fingerprint=data_fingerprint(sources), grad_accum=grad_accum)
