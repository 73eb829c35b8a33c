"""The files the bad-input rows name (`{placeholders}` in tests/cli/bad_input_cases.py): a few tiny
prepared shards, damaged copies of them, cluster profiles and sweep specs, and a one-step checkpoint."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np

from tests.cli.bad_input_cases import REPO, SMALL


def _copy(src: Path, dst: Path) -> None:
    shutil.rmtree(dst, ignore_errors=True)    # fixtures are rebuilt in place when WORKDIR is reused
    shutil.copytree(src, dst)


def _tar_members(path: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(path) as t:
        return [(m, t.extractfile(m).read()) for m in t.getmembers() if m.isfile()]


def _damage_first_shard(src: Path, dst: Path, change) -> None:
    """Copy a prepared shard folder, replacing each tokens.npy of its first shard by change(bytes):
    the damage a flipped disk block or a bad copy does, with the manifest's counts left as they were
    (every document of the shard, so the first step reads one whatever the shuffle)."""
    _copy(src, dst)
    shard = dst / "shard-000000.tar"
    members = _tar_members(shard)
    with tarfile.open(shard, "w") as t:
        for m, data in members:
            if m.name.endswith(".tokens.npy"):
                data = change(data)
            m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def build_fixtures(w: Path) -> dict:
    """The files the rows name, under `w`; returns the {placeholder: path} map."""
    from data.prepare import write_shards
    w.mkdir(parents=True, exist_ok=True)
    p = {"w": str(w), "tiny": str(REPO / "configs" / "tiny.toml")}
    docs = [f"doc {i}: " + "def f(x):\n    return x * %d\n" % i * 8 for i in range(60)]
    corpus = w / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    p["corpus"] = str(corpus)
    shards = w / "shards"
    shutil.rmtree(shards, ignore_errors=True)
    write_shards((d.encode() for d in docs), str(shards), shard_mb=0.01)   # several shards
    p["shards"] = str(shards)
    assert len(list(shards.glob("*.tar"))) >= 3
    (w / "a_file").write_text("not a folder\n")
    p["a_file"] = str(w / "a_file")
    (w / "empty").mkdir(exist_ok=True)
    p["empty_dir"] = str(w / "empty")
    (w / "empty.list").write_text("# no shards yet\n")
    p["empty_list"] = str(w / "empty.list")
    (w / "bad.toml").write_text("[run\ndir = 'x'\n")
    p["bad_toml"] = str(w / "bad.toml")
    miss = w / "missing-shard"
    _copy(shards, miss)
    (miss / "shard-000001.tar").unlink()
    p["missing_shard_dir"] = str(miss)
    garbled = w / "garbled-manifest"
    _copy(shards, garbled)
    (garbled / "manifest.json").write_text('{"format": "meshformer-shards/1", "shards": [')
    p["garbled_manifest_dir"] = str(garbled)
    bare = w / "bare"
    bare.mkdir(exist_ok=True)
    shutil.copy(shards / "shard-000000.tar", bare / "shard-000000.tar")   # token shards, no manifest, no txt
    p["tar_no_manifest"] = str(bare / "shard-000000.tar")

    def oov(data: bytes) -> bytes:
        ids = np.load(io.BytesIO(data))
        ids = ids.copy()
        ids[3] = 6000           # far beyond the byte tokenizer's 257 ids
        f = io.BytesIO()
        np.save(f, ids)
        return f.getvalue()
    _damage_first_shard(shards, w / "oov", oov)
    p["oov_dir"] = str(w / "oov")
    _damage_first_shard(shards, w / "bad-npy", lambda data: b"\x00" * len(data))
    p["bad_npy_dir"] = str(w / "bad-npy")
    (w / "empty_corpus").mkdir(exist_ok=True)
    (w / "empty_corpus" / "a.txt").write_text("")
    (w / "empty_corpus" / "b.jsonl").write_text("\n\n")
    p["empty_corpus"] = str(w / "empty_corpus")
    (w / "bad.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    p["bad_jsonl"] = str(w / "bad.jsonl")
    (w / "no-text.jsonl").write_text('{"body": "a record whose text is under another key"}\n')
    p["jsonl_no_text"] = str(w / "no-text.jsonl")
    profile = (REPO / "configs" / "clusters" / "a100-80gb.toml").read_text()
    (w / "no-pcie.toml").write_text(profile.replace("pcie_gbps = 25.0", "pcie_gbps = 0"))
    p["cluster_no_pcie"] = str(w / "no-pcie.toml")
    (w / "bad.csv").write_text("N,D,loss\n1e6,2e7,3.1\n2e6,4e7,lots\n")
    p["bad_csv"] = str(w / "bad.csv")
    (w / "good.csv").write_text("N,D,loss\n" + "".join(f"{n},{d},{2 + 1e3 / n + 1e4 / d}\n"
                                                       for n in (1e6, 2e6, 4e6) for d in (1e7, 2e7, 4e7)))
    p["good_csv"] = str(w / "good.csv")
    spec = (REPO / "configs" / "sweeps" / "tiny.toml").read_text()
    spec = spec.replace('out_dir = "runs/sweeps/tiny"', f'out_dir = "{w / "sweep"}"')
    spec = spec.replace('base_config = "configs/tiny.toml"', f'base_config = "{REPO / "configs" / "tiny.toml"}"')
    (w / "sweep.toml").write_text(spec)
    p["sweep_spec"] = str(w / "sweep.toml")
    (w / "sweep-bad.toml").write_text(spec.replace("budgets = [6e9, 1.2e10, 2.4e10]", "budgets = [6e9, -1]"))
    p["sweep_bad_budget"] = str(w / "sweep-bad.toml")
    (w / "sweep-mup-bad.toml").write_text(spec + "\n[mup]\nbase_dim = 0\n")
    p["sweep_mup_bad"] = str(w / "sweep-mup-bad.toml")
    (w / "sweep-moe-bad.toml").write_text(spec + "\n[moe]\nexperts = 4\ntop_k = 5\n")
    p["sweep_moe_bad"] = str(w / "sweep-moe-bad.toml")
    (w / "sweep-moe-every.toml").write_text(spec + "\n[moe]\nexperts = 4\nevery = 2\n")
    p["sweep_moe_every"] = str(w / "sweep-moe-every.toml")
    (w / "empty-run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    p["empty_run"] = str(w / "empty-run")
    (w / "empty-run-config" / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "configs" / "tiny.toml", w / "empty-run-config" / "config.toml")
    p["empty_run_with_config"] = str(w / "empty-run-config")
    p["run"] = str(w / "trained")
    if not (w / "trained" / "summary.json").exists():
        _train_one_step(p)
    for name, model in (("moe_softmax_bias", {"moe_experts": 4, "moe_bias_rate": 1e-3, "moe_norm_topk": False}),
                        ("moe_sigmoid_dense_between", {"moe_experts": 4, "moe_router": "sigmoid", "n_layers": 4,
                                                       "moe_every": 2})):
        p[name] = str(_model_edited_checkpoint(w / "trained", w / name, model))
    return p


def _model_edited_checkpoint(run: Path, dst: Path, model: dict) -> Path:
    """The run's checkpoint with other model.* fields in its train.json (checksums redone): for the
    export rows that refuse a model by its config before reading any weight."""
    from tests.checkpoint.helpers import forge_checksums
    src = sorted((run / "checkpoints").glob("step-*"))[-1]
    _copy(src, dst)
    meta = json.loads((dst / "train.json").read_text())
    meta["model"].update(model)
    (dst / "train.json").write_text(json.dumps(meta))
    forge_checksums(dst)
    return dst


def _train_one_step(p: dict) -> None:
    """A one-step checkpoint of the SMALL model for the generate and export rows."""
    from core.run_config import load_config
    from trainer.train import train
    args = [a.format(**p, id="fixture") for a in ("--run.dir", "{run}", "--data.urls", "{shards}", *SMALL)]
    train(load_config(p["tiny"], args))
