"""Slurm host lists: "n[1-3,7],gpu-a[01-02]" -> ["n1", "n2", "n3", "n7", "gpu-a01", "gpu-a02"].

`scontrol show hostnames` is the reference and is used when it is on PATH; the parser below is
hand-written (about 30 lines) because the jobs must also start where scontrol is absent (a
container without Slurm's client tools) and python-hostlist is not worth a dependency.
"""
from __future__ import annotations

import itertools
import re
import shutil
import socket
import subprocess

_GROUP = re.compile(r"\[([^\]]*)\]")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"host list {text!r}: ']' without '['")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"host list {text!r}: '[' without ']'")
    parts.append(text[start:])
    return [p for p in (s.strip() for s in parts) if p]


def _expand_range(item: str, where: str) -> list[str]:
    lo, sep, hi = item.partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
        raise ValueError(f"host list {where!r}: {item!r} is not a number or a range like 01-04")
    if not sep:
        return [lo]
    if int(hi) < int(lo):
        raise ValueError(f"host list {where!r}: range {item!r} runs backwards")
    width = len(lo)              # zero padding follows the lower bound, as in Slurm
    return [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]


def expand_nodelist(text: str) -> list[str]:
    """Expand Slurm's compact host list form (several bracket groups per name are allowed:
    "r[1-2]n[1-2]" gives the product r1n1, r1n2, r2n1, r2n2)."""
    hosts: list[str] = []
    for part in _split_top_level(text.strip()):
        pieces = _GROUP.split(part)         # literal, group, literal, group, ..., literal
        choices = []
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if "[" in piece or "]" in piece:
                    raise ValueError(f"host list {text!r}: unbalanced brackets in {part!r}")
                choices.append([piece])
            else:
                choices.append([n for item in piece.split(",") for n in _expand_range(item.strip(), text)])
        hosts.extend("".join(combo) for combo in itertools.product(*choices))
    if not hosts:
        raise ValueError(f"host list {text!r} names no host")
    return hosts


def hostnames(nodelist: str) -> list[str]:
    """The hosts of a Slurm node list: `scontrol show hostnames` when available, else our parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=20, check=True).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def node_address(name: str) -> str:
    """An address other nodes can reach `name` at: the name itself when it resolves, else the
    NodeAddr Slurm knows for it (nodes may be named apart from their host names)."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True,
                                 timeout=20).stdout
            m = re.search(r"\bNodeAddr=(\S+)", out)
            if m:
                return m.group(1)
        except (subprocess.SubprocessError, OSError):
            pass
    return name
