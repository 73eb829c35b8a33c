"""The on-disk layout of checkpoints, and the atomic commit that makes one visible.

    run.dir/checkpoints/
        step-00000100/          a complete checkpoint (has COMPLETE)
            .metadata, __<r>_0.distcp   DCP shards: "model.<fqn>" and "optim.<flattened key>"
            train.json          step, tokens, LR schedule, layout, model config (rank 0)
            rank-<r>.json       rank r's data-loader position, dp_rank and RNG states
            checksums-rank-<r>.json  size and CRC32 of every file rank r wrote (its shards, its JSON)
            checksums-metadata.json  the same for .metadata, and how many ranks wrote (rank 0)
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
import zlib
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


# ---- checksums ------------------------------------------------------------------------------
# Each rank records the size and CRC32 of every file it wrote, right after writing them (on the
# background writer thread for async saves; zlib releases the GIL); rank 0 adds .metadata's.
# CRC32 detects the damage that happens to files at rest or in transit (flipped, zeroed or
# truncated bytes, a lost file) at ~1 GB/s; it is not a signature (see CHECKPOINTS.md).

CHECKSUMS_RANK = "checksums-rank-{}.json"
CHECKSUMS_METADATA = "checksums-metadata.json"
_CHUNK = 8 << 20


def file_checksum(path: Path) -> dict:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc, size = zlib.crc32(chunk, crc), size + len(chunk)
    return {"size": size, "crc32": f"{crc:08x}"}


def write_checksums(folder: Path, manifest_name: str, names, extra: dict | None = None) -> None:
    folder = Path(folder)
    write_json(folder / manifest_name, {**(extra or {}), "files": {n: file_checksum(folder / n) for n in sorted(set(names))}})


def checksummed(folder: Path) -> bool:
    """Whether the checkpoint was written with checksums (older ones were not: they load unverified)."""
    folder = Path(folder)
    return (folder / CHECKSUMS_METADATA).exists() or any(folder.glob(CHECKSUMS_RANK.format("*")))


def checksum_manifest(folder: Path) -> dict:
    """{file name: expected {size, crc32}} over all ranks' records, or ValueError naming what is
    missing or unreadable."""
    folder = Path(folder)
    meta = _read_manifest(folder / CHECKSUMS_METADATA)
    world = meta.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"{CHECKSUMS_METADATA} has no valid world_size")
    expected = dict(meta["files"])
    for r in range(world):
        expected.update(_read_manifest(folder / CHECKSUMS_RANK.format(r))["files"])
    return expected


def _read_manifest(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.name} is missing") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path.name} is unreadable ({type(e).__name__})") from None
    if not isinstance(d, dict) or not isinstance(d.get("files"), dict):
        raise ValueError(f"{path.name} is not a checksum record")
    return d


def verify_files(folder: Path, expected: dict, names) -> str | None:
    """The first problem among `names` (a subset of `expected`'s files), or None."""
    folder = Path(folder)
    for name in names:
        want, path = expected[name], folder / name
        if not path.is_file():
            return f"{name} is missing"
        got = file_checksum(path)
        if got["size"] != want.get("size"):
            return f"{name} has {got['size']} bytes, {want.get('size')} were written"
        if got["crc32"] != want.get("crc32"):
            return f"{name} does not match its checksum (its bytes changed after the save)"
    return None


def find_damage(path: Path, part: int = 0, parts: int = 1) -> str | None:
    """What is wrong with a complete checkpoint's files, or None if they verify. With checksums,
    files `part`, `part + parts`, ... (in name order) are verified: ranks split the work. Older
    checkpoints, written without checksums, only have their JSON files parsed."""
    path = Path(path)
    try:
        if checksummed(path):
            expected = checksum_manifest(path)
            return verify_files(path, expected, sorted(expected)[part::parts])
        meta = read_json(path / "train.json", "checkpoint")
        for r in range(int(meta.get("world_size", 1))):
            read_json(path / f"rank-{r}.json", "checkpoint")
        return None if (path / ".metadata").is_file() else ".metadata is missing"
    except (ValueError, FileNotFoundError) as e:
        return str(e)
