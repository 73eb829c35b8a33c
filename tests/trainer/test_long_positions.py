"""Issue 20's positions: T5 relative bias (model.position = "relative") and RoPE scaling for
context extension (model.rope_scaling = "llama3" | "yarn"): the maths against transformers',
the bias for any key block, training and context extension through `meshformer train`, export."""
from __future__ import annotations

import json
import math

import pytest
import torch

from core.model_config import ModelConfig
from trainer.attention import AttnMask
from trainer.cli import main
from trainer.hf_llama import hf_config, to_hf
from trainer.model import Transformer
from trainer.relative_bias import RelativeBias, relative_bucket
from trainer.rope_scaling import attention_factor, hf_rope_parameters, rope_inv_freq

transformers = pytest.importorskip("transformers")

SCALED = {"llama3": dict(rope_scaling="llama3", rope_factor=4.0, rope_original_max_len=32),
          "yarn": dict(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=32)}


def test_relative_buckets_are_t5s_unidirectional_ones():
    from transformers.models.t5.modeling_t5 import T5Attention
    dist = torch.arange(-5, 700)      # i - j; T5's relative_position is j - i
    for buckets, max_distance in ((32, 128), (8, 16)):
        want = T5Attention._relative_position_bucket(-dist, bidirectional=False, num_buckets=buckets,
                                                     max_distance=max_distance)
        assert torch.equal(relative_bucket(dist, buckets, max_distance), want)


def test_relative_bias_of_a_key_block_is_that_block_of_the_full_bias():
    """What context parallel relies on: AttnMask.keys() re-targets the bias to any key block."""
    torch.manual_seed(0)
    rel = RelativeBias(8, 16, n_heads=3)
    pos = torch.arange(40)
    full = AttnMask(pos, pos, rel_bias=rel).bias(torch.float32)
    q_block = AttnMask(pos[24:32], pos[24:32], rel_bias=rel)
    for lo, hi in ((0, 8), (8, 24), (24, 32)):
        assert torch.equal(q_block.keys(pos[lo:hi]).bias(torch.float32), full[..., 24:32, lo:hi])
    assert full.shape == (1, 3, 40, 40) and torch.isinf(full[0, 0, 0, 1]) and full[0, 0, 39, 0] == rel.embeddings.weight[7, 0]


def test_relative_model_follows_positions_and_merges_key_blocks():
    """What a context-parallel rank relies on (as test_attention_core checks for the other kinds):
    permuted tokens with their positions give the permuted logits, and attention over key blocks
    merged by log-sum-exp equals attention over all keys. float64: the same maths in another order."""
    from tests.trainer.test_attention_core import merged, qkv
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, position="relative",
                      rel_buckets=8, rel_max_distance=16, max_seq_len=32, init_std=0.2)
    assert Transformer(cfg).num_params() == cfg.num_params() and \
        Transformer(cfg).num_params(False) == cfg.num_params(False)
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    tokens, perm = torch.randint(0, 64, (2, 16)), torch.randperm(16)
    with torch.no_grad():
        ref, shuffled = model(tokens), model(tokens[:, perm], positions=perm)
        assert (shuffled - ref[:, perm]).abs().max().item() < 1e-10
        q, k, v = qkv()
        pos = torch.arange(12)
        mask = AttnMask(pos, pos, rel_bias=model.layers["0"].attention.rel_bias)
        core = model.layers["0"].attention.core
        assert (merged(core, q, k, v, mask, [0, 5, 9, 12]) - core(q, k, v, mask)).abs().max().item() < 1e-12


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_rope_scaling_is_transformers_rope_init(kind):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = ModelConfig(vocab_size=64, dim=64, n_heads=2, max_seq_len=128, **SCALED[kind])   # head_dim 32: 16 frequencies
    # transformers' own defaults: yarn's attention factor left for it to derive from the factor
    params = {k: v for k, v in hf_rope_parameters(cfg).items() if k != "attention_factor"}
    hf = LlamaConfig(hidden_size=64, num_attention_heads=2, max_position_embeddings=128, rope_parameters=params)
    inv, factor = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    # the same float32 formulas, grouped differently (inv / f vs 1 / (f * base^x)): a few ulp apart
    torch.testing.assert_close(rope_inv_freq(cfg), inv, rtol=1e-6, atol=0)
    assert attention_factor(cfg) == pytest.approx(factor, rel=1e-12)
    plain = rope_inv_freq(ModelConfig(vocab_size=64, dim=64, n_heads=2))
    assert (rope_inv_freq(cfg) < plain).any() and torch.equal(rope_inv_freq(cfg)[0], plain[0])   # low freqs stretched, highest kept
    assert (factor > 1) == (kind == "yarn")


@pytest.mark.parametrize("kind", ["llama3", "yarn"])
def test_rope_scaled_model_exports_to_llama_with_our_logits(kind):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    # init_std 0.2: attention far from uniform, so a wrong frequency or attention factor shows in the logits
    cfg = ModelConfig(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128, init_std=0.2,
                      **SCALED[kind])
    ours = Transformer(cfg).eval()
    config = {k: v for k, v in hf_config(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = LlamaForCausalLM(LlamaConfig(**config)).eval()
    hf.load_state_dict(to_hf(ours.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, 64, (2, 120))             # well past rope_original_max_len = 32
    with torch.no_grad():
        want, got = ours(tokens), hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5       # the existing export test's bound (fp32, same maths)
    assert want.std() > 0.1


TINY = ["--config", "configs/tiny.toml", "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "4",
        "--train.batch_size", "2", "--train.eval_every", "0", "--train.eval_batches", "1", "--train.threads", "1",
        "--metrics.progress", "false", "--metrics.tensorboard", "false", "--metrics.log_every", "1"]


def _losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_train_relative_and_extend_a_rope_model_from_64_to_256(tmp_path, capsys):
    """On the built-in corpus through `meshformer train`: a relative-bias model trains and its export
    is refused in one line; a RoPE model trained at 64 positions resumes at 256 with yarn scaling
    (a changed model.max_seq_len / rope_* on resume) and exports to Llama with our logits."""
    rel = tmp_path / "rel"
    assert main(["train", *TINY, "--model.position", "relative", "--model.rel_buckets", "8",
                 "--model.rel_max_distance", "16", "--train.seq_len", "32", "--train.steps", "2",
                 "--run.dir", str(rel)]) == 0
    assert len(_losses(rel)) == 2 and all(math.isfinite(v) for v in _losses(rel).values())
    capsys.readouterr()
    assert main(["export", str(rel), "--out", str(tmp_path / "rel_hf")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.position = 'relative' cannot be exported" in err and "'rope'" in err

    run = tmp_path / "ext"
    assert main(["train", *TINY, "--model.max_seq_len", "64", "--train.seq_len", "64", "--train.steps", "2",
                 "--run.dir", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "hf64")]) == 0
    capsys.readouterr()
    yarn = ["--model.max_seq_len", "256", "--train.seq_len", "256", "--model.rope_scaling", "yarn",
            "--model.rope_factor", "4", "--model.rope_original_max_len", "64"]
    assert main(["train", *TINY, *yarn, "--train.steps", "4", "--run.dir", str(run)]) == 0
    assert "resumed from" in capsys.readouterr().out and sorted(_losses(run)) == [1, 2, 3, 4]
    # the same extension from an unscaled Llama export (checkpoint.init_from weights)
    assert main(["train", *TINY, *yarn, "--train.steps", "1", "--run.dir", str(tmp_path / "from_hf"),
                 "--checkpoint.init_from", str(tmp_path / "hf64")]) == 0
    out = tmp_path / "ext_hf"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["rope_parameters"]["rope_type"] == "yarn"
    capsys.readouterr()        # but a scaled export's positions cannot be silently dropped
    assert main(["train", *TINY, "--model.max_seq_len", "256", "--train.seq_len", "256", "--train.steps", "1",
                 "--run.dir", str(tmp_path / "unscaled"), "--checkpoint.init_from", str(out)]) == 2
    assert "rope_parameters" in capsys.readouterr().err
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    cfg = ModelConfig(vocab_size=320, dim=32, n_layers=1, n_heads=4, n_kv_heads=4, max_seq_len=256,
                      rope_scaling="yarn", rope_factor=4, rope_original_max_len=64)
    ours = Transformer(cfg).eval()
    load_model_weights(ours, complete_checkpoints(run / "checkpoints")[-1])
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    tokens = torch.randint(0, 320, (1, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-5


def test_planner_counts_the_relative_tables_sharded_with_the_heads():
    from parallel.planner.shapes import local_shape, param_specs
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, position="relative", rel_buckets=8,
                      rel_max_distance=16)
    with torch.device("meta"):
        model = Transformer(cfg)
    specs = {s.name: s for s in param_specs(cfg)}
    assert {n: s.shape for n, s in specs.items()} == {n: tuple(p.shape) for n, p in model.named_parameters()}
    assert tuple(local_shape(specs["layers.1.attention.rel_bias.embeddings.weight"], tp=2)) == (8, 2)   # heads / tp
