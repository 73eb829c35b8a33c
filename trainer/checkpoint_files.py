"""The on-disk layout of checkpoints, and the atomic commit that makes one visible.

    run.dir/checkpoints/
        step-00000100/          a complete checkpoint (has COMPLETE)
            .metadata, __<r>_0.distcp   DCP shards: "model.<fqn>" and "optim.<flattened key>"
            train.json          step, tokens, LR schedule, layout, model config (rank 0)
            rank-<r>.json       rank r's data-loader position, dp_rank and RNG states
            COMPLETE            written last, just before the rename
        .tmp-step-00000200/     being written (or left by a crash): never loaded, removed on the next save
        latest                  the name of the newest complete checkpoint (informational;
                                restore trusts COMPLETE markers, not this file)

A checkpoint is written under `.tmp-<name>` and renamed to `<name>` only once every rank's shards,
the metadata and the JSON files are on disk (rename is atomic on POSIX file systems), so a crash
at any point leaves the previous checkpoint the newest complete one.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

COMPLETE = "COMPLETE"
LATEST = "latest"
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name.split("-")[1])


def is_complete(path: Path) -> bool:
    return (Path(path) / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and is_complete(p)]
    return sorted(found, key=step_of)


def partial_checkpoints(root: Path) -> list[Path]:
    """Folders left by saves that never finished (temporary names, or no COMPLETE marker)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and (p.name.startswith(TMP_PREFIX)
                  or (p.name.startswith("step-") and not is_complete(p))))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj) -> None:
    """Write JSON durably: a temporary file, fsync, then rename over the target."""
    write_text(path, json.dumps(obj))


def write_text(path: Path, text: str) -> None:
    """Write text durably: a temporary file, fsync, then rename over the target."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def commit(tmp: Path, final: Path) -> None:
    """Mark `tmp` complete and rename it to `final` (rank 0 only, after all ranks wrote).
    An older folder of the same name (a re-save of the same step) is moved aside first and
    deleted only after the new one is in place."""
    (tmp / COMPLETE).write_text("")
    _fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}replaced-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    latest = final.parent / LATEST
    part = latest.with_name(LATEST + ".part")
    part.write_text(final.name + "\n")
    os.replace(part, latest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prune(root: Path, keep: int, protect_steps=()) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (never the newest one, whatever
    `keep` says); checkpoints at `protect_steps` are kept too. Returns what was deleted."""
    ckpts = complete_checkpoints(root)
    keep = max(1, keep)
    protect = set(protect_steps)
    gone = []
    for old in ckpts[: max(0, len(ckpts) - keep)]:
        if step_of(old) not in protect:
            shutil.rmtree(old)
            gone.append(old)
    return gone


def remove_partials(root: Path) -> None:
    for p in partial_checkpoints(root):
        shutil.rmtree(p, ignore_errors=True)


def read_json(path: Path, what: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} is missing")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON ({e})") from None
