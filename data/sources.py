"""From `data.urls` to indexed sources: every shard URL with its document and token counts.

The loader splits an epoch by token position (see plan.py), so it must know each shard's length
before reading. `meshformer prepare` writes those counts into manifest.json; shards without one
(e.g. made by plain `tar`) are scanned once and the counts cached under the cache dir.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import tarfile
from dataclasses import dataclass

from braceexpand import braceexpand
from filelock import FileLock

from core.data_config import BUILTIN_PREFIX

from .builtin import builtin_shards
from .documents import scan_source
from core.progress import progress
from .shards import DataError, is_local, local_path, shard_name
from .textfiles import ACCEPTED, file_format, looks_like_shard_list, unknown_file
from .tokenizer import PretokenizedInfo, tokenizer_from_spec

log = logging.getLogger("meshformer.data")
LIST_SUFFIXES = (".list", ".shards")   # and a .txt whose lines all name data files (looks_like_shard_list)
RAW_FORMATS = ("text", "jsonl", "parquet")
TAR_GLOBS = ("*.tar", "*.tar.gz", "*.tgz")
MANIFEST = "manifest.json"


@dataclass
class Source:
    shards: list[dict]  # {"url", "docs", "tokens", "mode": "text"|"tokens"}
    weight: float
    name: str

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] + s["docs"] for s in self.shards)  # one end-of-text per document


def expand_urls(entry: str, cfg, split: str, tokenizer, _depth: int = 0) -> list[str]:
    """One urls entry -> file URLs (brace patterns, globs, shard-list files, folders, builtin corpora)."""
    if entry.startswith(BUILTIN_PREFIX):
        return builtin_shards(entry, cfg, split, tokenizer)
    path = local_path(entry)
    if is_local(path) and os.path.isdir(path):
        return _folder_files(entry, path)
    if is_local(path) and any(c in path for c in "*?[") and not os.path.exists(path):
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise DataError(f"data.urls: {entry} matches no files")
        return [_checked_file(p) for p in found]
    if is_local(path) and (path.endswith(LIST_SUFFIXES) or path.endswith(".txt") and os.path.isfile(path)
                           and looks_like_shard_list(path)):
        if not os.path.isfile(path):
            raise DataError(f"data.urls: shard-list file not found: {entry}")
        if _depth > 4:
            raise DataError(f"data.urls: shard-list files nest too deep at {entry}")
        base = os.path.dirname(os.path.abspath(path))
        out = []
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                if is_local(line) and not os.path.isabs(local_path(line)):
                    line = os.path.join(base, line)
                out += expand_urls(line, cfg, split, tokenizer, _depth + 1)
        return out
    return [_checked_file(u) for u in braceexpand(entry)]


def _checked_file(url: str) -> str:
    """A local file must be of a format we read (a tar without the usual suffix is still a tar)."""
    path = local_path(url)
    if is_local(path) and os.path.isfile(path) and file_format(url) is None and not tarfile.is_tarfile(path):
        raise unknown_file(url)
    return url


def _folder_files(entry: str, path: str) -> list[str]:
    """A folder's *.tar shards (a prepared folder); without any, its raw text files, recursively."""
    found = sorted(p for g in TAR_GLOBS for p in glob.glob(os.path.join(path, g)))
    if found:
        _check_manifest_shards_present(path, found)
        return found
    raw = sorted(p for p in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                 if os.path.isfile(p) and file_format(p) in RAW_FORMATS)
    if not raw:
        raise DataError(f"data.urls: folder {entry} holds no *.tar shards nor data files; accepted: {ACCEPTED}")
    return raw


def _check_manifest_shards_present(folder: str, found: list[str]) -> None:
    """A folder read whole must hold every shard its manifest lists: a lost shard would otherwise
    shrink the corpus without a word (a glob cannot see what is missing)."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return
    have = {os.path.basename(p) for p in found}
    missing = [s.get("name") for s in _load_manifest(manifest)["shards"] if s.get("name") not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"data shard {missing[0]}{more} listed in {manifest} is missing from {folder}; "
                        "restore it, or rewrite the folder with `meshformer prepare`")


def _load_manifest(path: str):
    try:
        with open(path) as f:
            m = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(m, dict) or not isinstance(m.get("shards"), list):
        raise DataError(f"{path} is not a meshformer manifest (no 'shards' list); rewrite it with `meshformer prepare`")
    for entry in m["shards"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and all(isinstance(entry.get(k), int) and entry[k] >= 0 for k in ("docs", "tokens"))):
            raise DataError(f"manifest {path}: shard entry {entry!r} needs a name and counts docs, tokens >= 0; "
                            "rewrite it with `meshformer prepare`")
    return m


def find_manifest_for(cfg, entries: list[str]):
    """The manifest named by data.manifest, else the one next to the first local shard."""
    if cfg.manifest:
        return _load_manifest(cfg.manifest), cfg.manifest
    for entry in entries:
        if entry.startswith(BUILTIN_PREFIX):
            continue
        for url in expand_urls(entry, cfg, "train", None):
            if file_format(url) in RAW_FORMATS:
                raise DataError(f"data.tokenizer: 'pretokenized' reads shards written by `meshformer prepare`, but "
                                f"{url} is raw text; set data.tokenizer to 'bytes', 'hf:/path/tokenizer.json' or "
                                "'tiktoken:<encoding>' to tokenize it while training")
            path = local_path(url)
            if is_local(path):
                candidate = os.path.join(os.path.dirname(os.path.abspath(path)), MANIFEST)
                if os.path.isfile(candidate):
                    return _load_manifest(candidate), candidate
            break
    return None, None


def _manifest_entry(cfg, url: str, cache: dict):
    """(manifest, shard entry) for a shard, or (None, None)."""
    if cfg.manifest:
        key = cfg.manifest
        if not os.path.isfile(key):
            raise DataError(f"data.manifest: no file at {key}; give the manifest.json written by `meshformer prepare`, "
                            "or leave data.manifest empty")
    elif is_local(local_path(url)):
        key = os.path.join(os.path.dirname(os.path.abspath(local_path(url))), MANIFEST)
    else:
        return None, None
    if key not in cache:
        cache[key] = _load_manifest(key) if os.path.isfile(key) else None
        if cache[key] is not None:
            cache[key]["_by_name"] = {s["name"]: s for s in cache[key]["shards"]}
    m = cache[key]
    if m is None:
        return None, None
    return m, m["_by_name"].get(shard_name(url))


def _shard_fingerprint(url: str) -> str:
    path = local_path(url)
    if is_local(path):
        try:
            st = os.stat(path)
        except OSError:
            raise DataError(f"data shard not found: {url} (check data.urls / the shard-list file)") from None
        return f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}"
    return url


def index_shards(urls: list[str], cfg, tokenizer) -> list[dict]:
    """Document and token counts of each shard: from manifests, else from a cached scan."""
    manifests: dict = {}
    idents: dict = {}
    out: list[dict | None] = []
    to_scan: list[tuple[int, str, str, str, str]] = []   # (index, url, mode, field, format)
    for url in urls:
        fmt = file_format(url) or "tar"
        if fmt != "tar":       # raw text: tokenized while training, counted by one cached scan
            out.append(None)
            to_scan.append((len(out) - 1, url, "text", cfg.text_key, fmt))
            continue
        m, entry = _manifest_entry(cfg, url, manifests)
        same_ids = m is not None and (cfg.tokenizer == "pretokenized"
                                      or m.get("tokenizer_ident") == getattr(tokenizer, "ident", None))
        if entry is not None and same_ids:
            idents.setdefault(m.get("tokenizer_ident"), url)
            if len(idents) > 1:
                (a, ua), (b, ub) = list(idents.items())[:2]
                raise DataError(f"data.urls: shards were tokenized differently ({ua}: {a}, {ub}: {b}); "
                                "prepare all sources with one tokenizer")
            field = m.get("token_field", cfg.token_field)
            # ids of a manifest's shards lie below its vocab_size: the loader checks that per document
            vocab = m.get("vocab_size")
            out.append({"url": url, "docs": int(entry["docs"]), "tokens": int(entry["tokens"]),
                        "mode": "tokens", "field": field, **({"vocab": vocab} if isinstance(vocab, int) else {})})
        else:
            mode = "tokens" if cfg.tokenizer == "pretokenized" else "text"
            field = cfg.token_field if mode == "tokens" else cfg.text_field
            out.append(None)
            to_scan.append((len(out) - 1, url, mode, field, fmt))
    if to_scan:
        for i, entry in zip([t[0] for t in to_scan], _scan_cached(to_scan, cfg, tokenizer)):
            out[i] = entry
    return out


def _scan_cached(to_scan, cfg, tokenizer) -> list[dict]:
    ident = "pretokenized" if cfg.tokenizer == "pretokenized" else tokenizer.ident
    key_text = json.dumps([ident, cfg.on_corrupt] + [[_shard_fingerprint(u), mode, field, fmt]
                                                     for _, u, mode, field, fmt in to_scan])
    key = hashlib.sha256(key_text.encode()).hexdigest()[:24]
    folder = os.path.join(cfg.resolved_cache_dir(), "index")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{key}.json")
    with FileLock(path + ".lock"):  # one process of a job scans, the others wait and reuse
        if os.path.isfile(path):
            with open(path) as f:
                entries = json.load(f)
        else:
            log.info("scanning %d files without a manifest, once (run `meshformer prepare` to skip this)",
                     len(to_scan))
            entries = []
            with progress(len(to_scan), "scan", "files", enabled=len(to_scan) >= 8) as bar:
                for _, url, mode, field, fmt in to_scan:
                    e = scan_source(url, fmt=fmt, mode=mode, field=field, tokenizer=tokenizer,
                                    on_corrupt=cfg.on_corrupt)
                    e.update(mode=mode, field=field, format=fmt)
                    entries.append(e)
                    bar.update(1)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(entries, f)
            os.replace(tmp, path)
    missing = sum(e["missing_field"] for e in entries)
    corrupt = [e["url"] for e in entries if e["corrupt"]]
    if missing:
        log.warning("%d samples without field %r were skipped", missing, to_scan[0][3])
    if corrupt:
        log.warning("%d corrupt or truncated shards, readable part kept: %s", len(corrupt), ", ".join(corrupt[:5]))
    return entries


def build_sources(entries: list[str], weights: list[float], cfg, split: str, tokenizer) -> list[Source]:
    """Expand and index the URL entries; with weights each entry is its own source."""
    groups = [[e] for e in entries] if weights else [list(entries)]
    ws = list(weights) if weights else [1.0]
    sources = []
    for group, w in zip(groups, ws):
        urls = [u for e in group for u in expand_urls(e, cfg, split, tokenizer)]
        if not urls:
            raise DataError(f"data.urls: {group} names no shards (an empty shard-list file?)")
        sources.append(Source(index_shards(urls, cfg, tokenizer), float(w), " ".join(group)))
    if sum(s.tokens for s in sources if s.weight > 0) == 0:
        if all(x.get("format", "tar") != "tar" for src in sources for x in src.shards):
            raise DataError(f"data.urls: {entries} hold no documents: no JSON line or Parquet row has a string "
                            f"field {cfg.text_key!r} (and the text files are empty); set data.text_key to the "
                            "field holding the text")
        raise DataError(f"data.urls: {entries} hold no documents with field {cfg.text_field!r} "
                        f"(or {cfg.token_field!r}; in JSON lines / Parquet {cfg.text_key!r}); check data.text_field "
                        "(tar samples) or data.text_key (JSON lines, Parquet)")
    return sources


def source_stats(sources: list[Source]) -> dict:
    shards = [s for src in sources for s in src.shards]
    return {"shards": len(shards), "docs": sum(s["docs"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "missing_field": sum(s.get("missing_field", 0) for s in shards),
            "corrupt_shards": sum(1 for s in shards if s.get("corrupt"))}


def build_tokenizer(cfg):
    """The tokenizer of a DataConfig; for 'pretokenized' the one named in the shards' manifest."""
    if cfg.tokenizer != "pretokenized":
        return tokenizer_from_spec(cfg.tokenizer, cfg.eot_token)
    cfg.validate()  # urls may still be a TOML string
    manifest, where = find_manifest_for(cfg, cfg.urls)
    if manifest is None:
        raise DataError("data.tokenizer: 'pretokenized' needs a manifest.json (written by `meshformer prepare`) "
                         "next to the shards or in data.manifest; none found for " + ", ".join(cfg.urls))
    try:
        tok = tokenizer_from_spec(manifest["tokenizer"], cfg.eot_token)
        if tok.ident == manifest.get("tokenizer_ident"):
            return tok
    except Exception:  # e.g. the tokenizer.json named in the manifest is not on this machine
        pass
    try:  # ids without a tokenizer to decode them: enough to train
        return PretokenizedInfo(manifest["tokenizer_ident"], int(manifest["vocab_size"]), int(manifest["eot_id"]))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"data.tokenizer: manifest {where} lacks {e}; rewrite it with `meshformer prepare`") from e
