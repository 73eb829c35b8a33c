"""Shared by the sweep tests: write a sweep spec for the tiny IsoFLOP design into a tmp folder."""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).resolve().parent / "fake_trainer.py"
TINY = (REPO / "configs" / "sweeps" / "tiny.toml").read_text()


def write_spec(tmp: Path, trainer: list[str] | None = None, replace: dict | None = None) -> Path:
    """The repository's tiny sweep, writing under `tmp`, run by `trainer` (default: the fake)."""
    trainer = trainer or [sys.executable, str(FAKE)]
    text = TINY.replace('out_dir = "runs/sweeps/tiny"', f'out_dir = "{tmp / "sweep"}"')
    text = text.replace('base_config = "configs/tiny.toml"',
                        f'base_config = "{REPO / "configs" / "tiny.toml"}"\n'
                        f"trainer = {[str(t) for t in trainer]!r}".replace("'", '"'))
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp / "sweep.toml"
    path.write_text(text)
    return path
