"""`meshformer prepare`, the built-in corpus and the Hugging Face tokenizer path."""

import json
import os
import subprocess
import sys

import pytest

from datahelpers import slot_stream, text_docs
from data import DataConfig, build_loader, build_tokenizer
from data.prepare import main as prepare_main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def epoch_docs(cfg, eot, split="train"):
    if split == "val":
        batches = list(build_loader(cfg, split="val", seq_len=32, batch_size=4, dp_rank=0, dp_size=1, seed=0))
    else:
        loader = build_loader(cfg, split="train", seq_len=32, batch_size=4, dp_rank=0, dp_size=1, seed=0)
        batches = []
        for b in loader:
            batches.append(b)
            if loader.state_dict()["epoch"] == 1:
                break
    out, cur = [], []
    for t in slot_stream(batches, eot):
        if t == eot:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def write_inputs(tmp_path):
    docs = text_docs(40, seed=7)
    (tmp_path / "in").mkdir()
    with open(tmp_path / "in" / "part.jsonl", "w") as f:
        for d in docs[:30]:
            f.write(json.dumps({"text": d, "meta": 1}) + "\n")
        f.write(json.dumps({"no_text": 1}) + "\n")
    for i, d in enumerate(docs[30:]):
        (tmp_path / "in" / f"doc{i}.txt").write_text(d)
    return docs


def test_prepare_writes_shards_and_manifest_the_loader_reads(tmp_path, capsys):
    docs = write_inputs(tmp_path)
    out = tmp_path / "out"
    assert prepare_main([str(tmp_path / "in"), "--out", str(out), "--shard-size-mb", "0.004", "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 JSON lines" in err
    # stderr is no terminal here: plain progress lines (quarters), no bar redrawn with carriage returns
    assert "\r" not in err and "prepare: " in err and " done in " in err and err.count("prepare: ") <= 5
    manifest = json.loads((out / "manifest.json").read_text())
    val = json.loads((out / "val" / "manifest.json").read_text())
    # the default --val-fraction 0.01 holds out every 100th document: of 40, the first
    assert manifest["docs"] == 39 and val["docs"] == 1
    assert manifest["tokens"] + val["tokens"] == sum(len(d.encode()) for d in docs)
    assert len(manifest["shards"]) > 2
    assert sum(s["docs"] for s in manifest["shards"]) == 39
    assert sorted(os.listdir(out)) == sorted([s["name"] for s in manifest["shards"]] + ["manifest.json", "val"])
    cfg = DataConfig(urls=[str(out)], cache_dir=str(tmp_path / "c"))
    loader = build_loader(cfg, split="train", seq_len=8, batch_size=2, dp_rank=0, dp_size=1, seed=0)
    assert all(s["mode"] == "tokens" for s in loader.sources[0].shards)  # manifest used, no scan
    got = [bytes(d).decode() for d in epoch_docs(cfg, 256)]
    held_out = [bytes(d).decode() for d in epoch_docs(cfg, 256, split="val")]   # found in out/val/
    assert sorted(got + held_out) == sorted(docs) and not set(got) & set(held_out)
    # nothing a user saved is overwritten
    assert prepare_main([str(tmp_path / "in"), "--out", str(out)]) == 2


def test_validation_split_is_every_kth_document_in_input_order(tmp_path):
    docs = write_inputs(tmp_path)
    in_order = docs[30:] + docs[:30]       # doc0..doc9.txt sort before part.jsonl
    out = tmp_path / "out"
    assert prepare_main([str(tmp_path / "in"), "--out", str(out), "--val-fraction", "0.25", "--workers", "1"]) == 0
    cfg = DataConfig(urls=[str(out)], cache_dir=str(tmp_path / "c"), shuffle=False)
    assert [bytes(d).decode() for d in epoch_docs(cfg, 256, split="val")] == in_order[0::4]
    assert prepare_main([str(tmp_path / "in"), "--out", str(tmp_path / "none"), "--val-fraction", "0"]) == 0
    assert not (tmp_path / "none" / "val").exists()


def test_prepare_output_does_not_depend_on_worker_count(tmp_path):
    write_inputs(tmp_path)
    for w in (1, 2):
        assert prepare_main([str(tmp_path / "in"), "--out", str(tmp_path / f"o{w}"), "--shard-size-mb", "0.004",
                             "--workers", str(w)]) == 0
    m1, m2 = (json.loads((tmp_path / f"o{w}" / "manifest.json").read_text()) for w in (1, 2))
    assert m1 == m2


def test_python_m_data_prepare_runs(tmp_path):
    write_inputs(tmp_path)
    out = subprocess.run([sys.executable, "-m", "data.prepare", str(tmp_path / "in" / "doc0.txt"), "--out",
                          str(tmp_path / "o"), "--workers", "1"], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "wrote 1 shards, 1 documents" in out.stdout


def make_hf_tokenizer(path, corpus):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    tok.save(str(path))


def test_hf_tokenizer_on_the_fly_and_prepared(tmp_path):
    docs = write_inputs(tmp_path)
    tj = tmp_path / "tokenizer.json"
    make_hf_tokenizer(tj, docs)
    cfg = DataConfig(urls=[], tokenizer=f"hf:{tj}", cache_dir=str(tmp_path / "c"))
    tok = build_tokenizer(cfg)
    assert tok.eot_id == 0 and tok.vocab_size <= 300
    assert tok.decode(tok.encode(docs[0])) == docs[0]
    assert prepare_main([str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--tokenizer", f"hf:{tj}",
                         "--workers", "2"]) == 0
    cfg.urls = [str(tmp_path / "o")]
    got = sorted(tok.decode(d) for split in ("train", "val") for d in epoch_docs(cfg, tok.eot_id, split))
    assert got == sorted(docs)
    # the same shards read as 'pretokenized' find their tokenizer in the manifest
    pre = DataConfig(urls=[str(tmp_path / "o")], tokenizer="pretokenized", cache_dir=str(tmp_path / "c"))
    assert build_tokenizer(pre).eot_id == tok.eot_id


@pytest.mark.slow
def test_builtin_corpus_prepared_once_split_by_path_hash(tmp_path):
    """Two processes ask for the built-in corpus at once: one prepares it, both get the same shards."""
    code = ("import sys; from data import DataConfig, build_loader; "
            "cfg = DataConfig(cache_dir=sys.argv[1]); "
            "l = build_loader(cfg, split='train', seq_len=64, batch_size=2, dp_rank=0, dp_size=1, seed=0); "
            "print(l.stats['docs'], l.stats['tokens'])")
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "cache")], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    folders = [f for f in os.listdir(tmp_path / "cache" / "builtin") if not f.endswith(".lock")]
    assert len(folders) == 1 and not any(".tmp" in f for f in folders)
    base = tmp_path / "cache" / "builtin" / folders[0]
    train = json.loads((base / "train" / "manifest.json").read_text())
    val = json.loads((base / "val" / "manifest.json").read_text())
    assert train["docs"] > 300 and 5 <= val["docs"] < train["docs"] / 8
    assert train["tokens"] > 2_000_000
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    val_loader = build_loader(cfg, split="val", seq_len=64, batch_size=4, dp_rank=0, dp_size=1, seed=0)
    assert val_loader.stats["docs"] == val["docs"]


def test_prepare_reads_json_arrays_and_rejects_bad_input(tmp_path, capsys):
    docs = text_docs(5, seed=2)
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs] + [{"title": "no text"}]))
    assert prepare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "o"), "--workers", "1",
                         "--val-fraction", "0"]) == 0
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["docs"] == 5
    assert prepare_main([str(tmp_path / "missing*.jsonl"), "--out", str(tmp_path / "o2")]) == 2
    assert "matches no files" in capsys.readouterr().err
    assert prepare_main([str(tmp_path / "a.json"), "--out", str(tmp_path / "o3"), "--tokenizer", "nope"]) == 2


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_elsewhere():
    import io

    from tqdm import tqdm

    from core.progress import progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    bar = progress(10, "prepare", "B", file=Terminal())
    assert isinstance(bar, tqdm)
    bar.close()
    log = io.StringIO()
    with progress(8, "scan", "files", file=log) as p:
        for _ in range(8):
            p.update(1)
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "scan: 25% (2 of 8 files)", "scan: 50% (4 of 8 files)", "scan: 75% (6 of 8 files)", "scan: 8 files done in 0.0 s"]
    assert lines[0].endswith("s left") and lines[-1].startswith("scan: 8 files done in ")
