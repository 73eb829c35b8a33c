"""`meshformer eval`, `generate --draft`, `--quantize` and `--bench` on two tiny trained runs
(issue 23), plus the byte counts the bandwidth share rests on."""
import json
import math

import pytest
import torch
from torch import nn

from core.model_config import ModelConfig
from core.run_config import load_config
from data.prepare import write_shards
from trainer.cli import main
from trainer.inference_weights import kv_bytes_per_position, prepare_weights, stored_bytes, weight_bytes_per_step
from trainer.model import Transformer
from trainer.perplexity import evaluate

DOCS = [f"def f{i}(x):\n    return x * {i} + 1\n" for i in range(300)]
SMALL = ["--model.n_layers", "1", "--model.max_seq_len", "64", "--train.seq_len", "32", "--train.batch_size", "4",
         "--train.steps", "30", "--train.eval_every", "0", "--train.eval_batches", "1", "--optim.warmup_steps", "3",
         "--optim.lr", "1e-2", "--metrics.log_every", "100", "--metrics.progress", "false",
         "--metrics.tensorboard", "false", "--train.threads", "1", "--checkpoint.every", "0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A target (dim 48) and a draft (dim 32) with the byte tokenizer, validation data = the shards."""
    from trainer.train import train
    w = tmp_path_factory.mktemp("infer")
    write_shards((d.encode() for d in DOCS), str(w / "shards"), tokenizer="bytes")
    for name, dim in (("target", 48), ("draft", 32)):
        train(load_config("configs/tiny.toml", SMALL + [
            "--model.dim", str(dim), "--model.n_heads", "2", "--model.n_kv_heads", "2", "--run.dir", str(w / name),
            "--data.urls", str(w / "shards"), "--data.val_urls", str(w / "shards")]))
    return w / "target", w / "draft"


def run_cli(capsys, *argv) -> tuple[str, str]:
    assert main([str(a) for a in argv]) == 0
    got = capsys.readouterr()
    return got.out, got.err


def test_eval_reports_loss_perplexity_and_bits_per_byte(runs, capsys):
    target, _ = runs
    plain = json.loads(run_cli(capsys, "eval", target, "--batches", "2", "--json")[0])
    assert plain["tokens"] == plain["bytes"] == 2 * 4 * 32           # byte tokenizer: one token, one byte
    assert plain["bits_per_byte"] == pytest.approx(plain["loss"] / math.log(2), rel=1e-12)
    assert plain["perplexity"] == pytest.approx(math.exp(plain["loss"]), rel=1e-12)
    int8 = json.loads(run_cli(capsys, "eval", target, "--batches", "2", "--json", "--quantize", "int8")[0])
    assert int8["quantize"] == "int8" and int8["loss"] != plain["loss"] and int8["tokens"] == plain["tokens"]


def test_bits_per_byte_counts_decoded_bytes():
    """A model with zero logits has loss ln V per token; a tokenizer whose tokens are 3 bytes of
    text each (eot one) then gives ln V / ln 2 / 3 bits per byte away from end-of-text tokens."""
    class ThreeBytes:
        ident, eot_id = "three", 7
        def decode(self, ids):
            return "".join("abc" for _ in ids)
    model = Transformer(ModelConfig(vocab_size=8, dim=16, n_layers=1, n_heads=1, max_seq_len=16))
    with torch.no_grad():
        model.output.weight.zero_()
    labels = torch.tensor([[1, 2, 3, 4], [7, 5, 6, 0]])
    got = evaluate(model, [(torch.zeros_like(labels), labels)], ThreeBytes())
    assert got["loss"] == pytest.approx(math.log(8), rel=1e-6) and got["bytes"] == 7 * 3 + 1
    assert got["bits_per_byte"] == pytest.approx(8 * math.log(8) / math.log(2) / 22, rel=1e-6)


def test_speculative_generate_prints_acceptance_and_speed_up(runs, capsys):
    target, draft = runs
    out, err = run_cli(capsys, "generate", target, "--draft", draft, "--temperature", "0", "--tokens", "20",
                       "--draft-tokens", "3", "--prompt", "def f1")
    plain, _ = run_cli(capsys, "generate", target, "--temperature", "0", "--tokens", "20", "--prompt", "def f1")
    assert out == plain and "acceptance rate" in err and "speed-up" in err and "identical to plain greedy" in err
    _, err = run_cli(capsys, "generate", target, "--draft", draft, "--tokens", "20", "--prompt", "def f1")
    assert "acceptance rate" in err and "identical" not in err          # sampling: no claim of equality


def test_bench_rows_and_byte_counts(runs, capsys):
    target, draft = runs
    result = json.loads(run_cli(capsys, "generate", target, "--draft", draft, "--bench", "--json", "--tokens", "8",
                                "--batch-sizes", "1,2", "--prompt", "def f1")[0])
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert len(rows) == 4 * 2 + 2 and result["copy_gb_per_s"] > 0
    for r in result["rows"]:
        share = r["read_gb_per_s"] / result["copy_gb_per_s"]
        assert r["bandwidth_share"] == pytest.approx(share, rel=1e-9) and r["tokens_per_s"] > 0
    # batching shares the weights: bytes per token fall; int8 and bf16 read fewer bytes than fp32
    assert rows[("fp32", 2)]["bytes_per_token"] < rows[("fp32", 1)]["bytes_per_token"]
    assert rows[("int8 (fp32 act.)", 1)]["bytes_per_token"] < rows[("bf16", 1)]["bytes_per_token"] \
        < rows[("fp32", 1)]["bytes_per_token"]
    assert 0 <= rows[("speculative k=4", 1)]["acceptance"] <= 1


def test_weight_and_kv_bytes():
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16)
    model = Transformer(cfg)
    fp32 = weight_bytes_per_step(model, 1)
    embed = 64 * 32 * 4
    assert fp32 == 4 * model.num_params() - embed + 32 * 4          # one embedding row of 32 floats
    assert weight_bytes_per_step(model, 3) == fp32 + 2 * 32 * 4
    assert kv_bytes_per_position(model, 5) == 2 * 2 * 1 * 16 * 5 * 4   # k and v, layers, kv heads, head_dim, rows
    prepare_weights(model, "fp32", "int8")
    w = model.layers["0"].attention.wq.weight
    # int8 data, and per output row an fp32 scale and an int8 zero point
    assert stored_bytes(w) == 32 * 32 + 32 * (4 + 1)
    lin = nn.Linear(32, 32, bias=False)
    assert stored_bytes(lin.weight) == 32 * 32 * 4
