"""Issue 18's acceptance, walked as a newcomer would with the CLI alone: a folder of their own
.txt / .jsonl / .jsonl.zst / .parquet files and a `tokenizers` JSON -> `meshformer prepare` (with its
validation split) -> `meshformer train` (evaluating on it) -> `meshformer generate RUN_DIR` ->
`meshformer export RUN_DIR OUT` -> transformers' AutoTokenizer + AutoModelForCausalLM generating
from the export exactly what `meshformer generate` printed."""
import json
import math

import pytest
import torch

from trainer.cli import main

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

# Code-like documents with multi-byte characters: 100 docs in five files of four formats.
DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 5}  # café – 日本 {i % 7}\n" for i in range(100)]
PROMPT, NEW, STEPS = "def f", 16, 60
SMALL = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "1",
         "--model.max_seq_len", "64", "--train.seq_len", "32", "--train.batch_size", "4",
         "--train.steps", str(STEPS), "--train.eval_every", "30", "--train.eval_batches", "1",
         "--optim.warmup_steps", "5", "--optim.lr", "1e-2", "--metrics.log_every", "30",
         "--metrics.progress", "false", "--metrics.tensorboard", "false", "--train.threads", "1"]


def own_corpus(folder):
    """The formats web-scale corpora ship in, side by side in one folder."""
    folder.mkdir()
    for i, doc in enumerate(DOCS[:20]):
        (folder / f"doc{i:02d}.txt").write_text(doc)
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[20:50]))
    raw = "".join(json.dumps({"text": d, "id": n}) + "\n" for n, d in enumerate(DOCS[50:70])).encode()
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"text": DOCS[70:], "url": ["x"] * 30}), folder / "d.parquet", row_group_size=10)


def bpe(path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(path))
    return path


def test_own_files_to_transformers_generation(tmp_path, capsys):
    own_corpus(tmp_path / "corpus")
    tj = bpe(tmp_path / "tokenizer.json")
    shards, run, out = tmp_path / "shards", tmp_path / "runs" / "mine", tmp_path / "hf"

    assert main(["prepare", str(tmp_path / "corpus"), "--out", str(shards), "--tokenizer", f"hf:{tj}",
                 "--workers", "1"]) == 0
    assert (shards / "val").is_dir()                  # the held-out split, made by default
    capsys.readouterr()

    assert main(["train", "--config", "configs/tiny.toml", *SMALL, "--data.urls", str(shards),
                 "--data.tokenizer", "pretokenized", "--run.dir", str(run)]) == 0
    said = capsys.readouterr()
    assert "vocabulary 320 (the 300 ids" in said.err       # follows the tokenizer, rounded up to 64
    assert "no validation data" not in said.err + said.out
    assert f"done: {STEPS}/{STEPS} steps" in said.out and "final validation loss" in said.out
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    assert sorted(val) == [0, 30, 60] and all(math.isfinite(v) for v in val.values())
    assert val[60] < val[0]                               # it learned from the user's files

    assert main(["generate", str(run), "--prompt", PROMPT, "--tokens", str(NEW), "--temperature", "0"]) == 0
    ours = capsys.readouterr()
    assert f"checkpoint {run}/checkpoints/step-{STEPS:08d} (step {STEPS})" in ours.err

    tj.unlink()                                           # the run folder carries its own tokenizer
    assert main(["export", str(run), str(out)]) == 0
    capsys.readouterr()
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert model.config.vocab_size == 320 and len(tok) == 300
    ids = tok(PROMPT, return_tensors="pt").input_ids
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    assert tok.decode(gen[0]) + "\n" == ours.out          # transformers continues the prompt as we do
    assert len(set(gen[0, ids.shape[1]:].tolist())) > 1   # and says something, not one token repeated
