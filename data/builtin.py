"""The built-in corpus: this Python's standard library sources, prepared into shards on first use.

No download: the files are already on every machine that runs us. Files are taken sorted by
relative path (test suites, idlelib, lib2to3, ensurepip and site-packages left out, to keep it
~10 MB and stable), and a file goes to validation when a hash of its path says so. The shards
live in <cache>/builtin/<key>/{train,val}, keyed by Python version, file list and tokenizer;
a file lock plus an atomic rename let concurrent ranks share one preparation.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import sysconfig

from filelock import FileLock

from .prepare import write_shards

EXCLUDE_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "ensurepip",
                "__pycache__", "turtledemo"}
SHARD_MB = 4.0
VERSION = 1


def stdlib_files() -> tuple[str, list[str]]:
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDE_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    if not found:
        raise FileNotFoundError(f"builtin:stdlib: no *.py files under {root}; this Python has no standard "
                                "library sources, give data.urls shards instead")
    return root, sorted(found)


def is_val(relpath: str, percent: float) -> bool:
    h = int.from_bytes(hashlib.sha256(relpath.encode()).digest()[:8], "big")
    return (h % 10000) < percent * 100


def prepare_builtin(cfg, tokenizer) -> str:
    """Folder holding train/ and val/ shards of builtin:stdlib for this tokenizer (prepared once)."""
    root, files = stdlib_files()
    listing = "\n".join(f"{p}:{os.path.getsize(os.path.join(root, p))}" for p in files)
    key_text = f"{VERSION}|{sys.version}|{tokenizer.ident}|{cfg.builtin_val_percent}|{listing}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:16]
    base = os.path.join(cfg.resolved_cache_dir(), "builtin")
    final = os.path.join(base, f"stdlib-py{sys.version_info[0]}.{sys.version_info[1]}-{key}")
    if os.path.isfile(os.path.join(final, "val", "manifest.json")):
        return final
    os.makedirs(base, exist_ok=True)
    with FileLock(final + ".lock"):
        if os.path.isfile(os.path.join(final, "val", "manifest.json")):
            return final  # another process prepared it while we waited
        tmp = f"{final}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)

        def docs(want_val: bool):
            for p in files:
                if is_val(p, cfg.builtin_val_percent) == want_val:
                    with open(os.path.join(root, p), "rb") as f:
                        yield f.read()

        spec = tokenizer.spec
        write_shards(docs(False), os.path.join(tmp, "train"), tokenizer=spec, eot_token=cfg.eot_token,
                     shard_mb=SHARD_MB)
        write_shards(docs(True), os.path.join(tmp, "val"), tokenizer=spec, eot_token=cfg.eot_token,
                     shard_mb=SHARD_MB)
        os.replace(tmp, final)
    return final


def builtin_shards(entry: str, cfg, split: str, tokenizer) -> list[str]:
    if entry != "builtin:stdlib":
        raise ValueError(f"data.urls: unknown built-in corpus {entry!r}; known: builtin:stdlib")
    if tokenizer is None or tokenizer.spec == "pretokenized":
        raise ValueError("data.tokenizer: the built-in corpus needs a real tokenizer ('bytes', 'hf:...')")
    folder = os.path.join(prepare_builtin(cfg, tokenizer), "val" if split == "val" else "train")
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".tar"))
