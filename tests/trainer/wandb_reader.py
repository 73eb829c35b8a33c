"""Read back what an offline W&B run wrote (tests only)."""
from __future__ import annotations

import glob
import struct
import time


def wandb_records(run_dir, timeout: float = 60.0) -> list:
    """The records of every offline W&B run under run_dir, once each run's file holds its `exit`
    record: wandb's service process may still be writing the file after `run.finish()` returns
    (seen here: the history rows landed ~0.1 s after a loaded machine's finish)."""
    deadline = time.monotonic() + timeout
    while True:
        records = _read_all(run_dir)
        paths = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
        exits = sum(r.WhichOneof("record_type") == "exit" for r in records)
        if (paths and exits >= len(paths)) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def _read_all(run_dir) -> list:
    """The records of every offline W&B run file under run_dir. wandb 0.31 writes them in LevelDB's
    log format (32 KiB blocks of records with a 7-byte header: crc32, length, type FULL/FIRST/
    MIDDLE/LAST) after a 7-byte file header, and ships no Python reader for it: these 15 lines."""
    from wandb.proto import wandb_internal_pb2 as pb
    records = []
    for path in sorted(glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))):
        data, pos, buf = open(path, "rb").read(), 7, b""
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:                  # a block's tail too short for a header
                pos += 32768 - pos % 32768
                continue
            _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if kind == 0:
                break
            buf, pos = buf + data[pos + 7:pos + 7 + n], pos + 7 + n
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(buf)
                records.append(record)
                buf = b""
    return records
