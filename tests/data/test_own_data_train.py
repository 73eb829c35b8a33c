"""Own data through the trainer: the model's vocabulary follows the tokenizer, `meshformer prepare`'s
validation split is evaluated on, and a run without validation data says so once."""

import json
import math

import pytest

from datahelpers import text_docs, train_bpe_tokenizer
from core.errors import ConfigError
from core.model_config import ModelConfig
from core.run_config import load_config
from data import build_tokenizer
from data.prepare import main as prepare_main
from trainer.train import train
from trainer.vocab import resolve_vocab

SMALL = ["--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "2",
         "--train.seq_len", "16", "--train.batch_size", "2", "--train.steps", "2", "--train.eval_batches", "1",
         "--metrics.progress", "false", "--metrics.tensorboard", "false", "--checkpoint.every", "0",
         "--train.threads", "1"]


def test_vocabulary_follows_the_tokenizer_unless_set(tmp_path):
    tj = train_bpe_tokenizer(tmp_path / "tokenizer.json", vocab_size=300)
    cfg = load_config(None, ["--data.tokenizer", f"hf:{tj}"])
    assert cfg.model.vocab_size == 0          # auto: the file is read when a run starts
    tok = build_tokenizer(cfg.data)
    assert tok.vocab_size == 300
    assert "the 300 ids of data.tokenizer" in resolve_vocab(cfg.model, tok, cfg.data.tokenizer)
    assert cfg.model.vocab_size == 320        # 300 rounded up to a multiple of 64
    explicit = ModelConfig(vocab_size=512)
    assert resolve_vocab(explicit, tok, "hf:x").startswith("model.vocab_size;") and explicit.vocab_size == 512
    with pytest.raises(ConfigError, match=r"model.vocab_size: 256 is smaller .* use at least 300, or 0 to follow"):
        resolve_vocab(ModelConfig(vocab_size=256), tok, "hf:x")
    # the byte tokenizer's 257 ids are known by name: resolved when the config loads (tiny.toml: 320)
    assert load_config("configs/tiny.toml").model.vocab_size == 320


def test_prepared_split_is_evaluated_and_a_run_without_one_says_so(tmp_path, capsys):
    docs = text_docs(40, seed=3, max_len=120)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tj = train_bpe_tokenizer(tmp_path / "tokenizer.json", vocab_size=300)
    assert prepare_main([str(corpus), "--out", str(tmp_path / "shards"), "--tokenizer", f"hf:{tj}",
                         "--workers", "1"]) == 0
    capsys.readouterr()

    small = SMALL + ["--data.cache_dir", str(tmp_path / "cache")]    # the scan index: not in the user's cache
    cfg = load_config("configs/tiny.toml", small + ["--run.dir", str(tmp_path / "run"), "--data.urls",
                                                    str(tmp_path / "shards"), "--data.tokenizer", "pretokenized"])
    summary = train(cfg)
    err = capsys.readouterr().err
    assert f"vocabulary 320 (the 300 ids of data.tokenizer 'pretokenized with hf:{tj}'" in err
    assert "no validation data" not in err
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 2]      # before training and at the end
    assert math.isfinite(summary["final_val_loss"])
    assert load_config(tmp_path / "run" / "config.toml").model.vocab_size == 320   # the run folder holds the number

    # raw JSON lines, tokenized while training: no split beside them, and the run says so once
    cfg = load_config("configs/tiny.toml", small + ["--run.dir", str(tmp_path / "raw"), "--data.urls", str(corpus),
                                                    "--data.tokenizer", f"hf:{tj}"])
    summary = train(cfg)
    assert capsys.readouterr().err.count("no validation data") == 1
    assert math.isnan(summary["final_val_loss"])
