"""MoE export to Hugging Face (trainer/hf_moe.py): every format gives our logits in transformers.

Tolerance 1e-5 on logits of std ~0.1, as for the Llama export (tests/checkpoint/test_export.py):
fp32 both sides, the same operations summed in another order (measured: <= 1e-7 here).
"""
import json

import pytest
import torch

from tests.checkpoint.helpers import config, run
from trainer.checkpoint_state import CheckpointError
from trainer.export import main as export_main
from trainer.hf_moe import moe_format, moe_hf_config, moe_to_hf
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")

MOE = ["--model.moe_experts", "4", "--model.moe_top_k", "2", "--model.moe_hidden", "16"]
TOKENS = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))


def hf_load(out):
    return transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def test_exported_moe_run_gives_our_logits_with_its_tokenizer(tmp_path):
    """A trained run (shared expert, a dense block first, expert bias) through `meshformer export`."""
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    d = tmp_path / "run"
    extra = [*MOE, "--model.moe_shared_experts", "1", "--model.moe_every", "2", "--model.moe_router", "sigmoid",
             "--model.moe_bias_rate", "0.01", "--train.steps", "3"]
    run(d, *extra)
    out = tmp_path / "hf"
    assert export_main([str(d), "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Glm4MoeForCausalLM"]
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}
    ours = Transformer(config(d, *extra).model).eval()
    load_model_weights(ours, complete_checkpoints(d / "checkpoints")[-1])
    bias = ours.layers["1"].feed_forward.expert_bias
    assert bias.abs().max() > 0                      # the bias trained (3 steps x 0.01) and went with the export
    hf = hf_load(out)
    with torch.no_grad():
        want, got = ours(TOKENS), hf(TOKENS).logits
    assert (got - want).abs().max().item() < 1e-5 and want.std() > 0.1
    assert torch.equal(hf.model.layers[1].mlp.gate.e_score_correction_bias, bias)
    assert transformers.AutoTokenizer.from_pretrained(str(out)).decode([104, 105]) == "hi"


def random_model(*extra):
    """A model with a wide router (std 0.5: tokens spread over the experts, the top-k far from
    ties) and, for the sigmoid router, a bias large enough to change the choice."""
    mc = config("unused", "--model.n_layers", "3", *MOE, *extra).model
    model = Transformer(mc)
    model.init_weights(0)
    g = torch.Generator().manual_seed(2)
    for layer in model.layers.values():
        ff = layer.feed_forward
        if hasattr(ff, "router"):
            ff.router.weight.data = torch.randn(ff.router.weight.shape, generator=g) * 0.5
            if mc.moe_bias_rate:
                ff.expert_bias = torch.randn(mc.moe_experts, generator=g) * 0.2
    return model.eval(), mc


@pytest.mark.parametrize("extra, fmt", [
    ([], "mixtral"),
    (["--model.moe_sinkhorn_iters", "10", "--model.moe_aux_coef", "0"], "mixtral"),   # a training-only choice
    (["--model.moe_shared_experts", "1", "--model.moe_every", "2"], "qwen2_moe"),
    (["--model.moe_norm_topk", "false"], "qwen2_moe"),       # Mixtral always renormalises
    (["--model.moe_router", "sigmoid", "--model.moe_bias_rate", "1e-3", "--model.moe_norm_topk", "false"], "glm4_moe"),
    (["--model.moe_router", "sigmoid", "--model.moe_every", "3", "--model.moe_shared_experts", "2"], "glm4_moe"),
    (["--model.moe_bias_rate", "1e-3"], "ernie4_5_moe"),
    (["--model.moe_bias_rate", "1e-3", "--model.moe_every", "2", "--model.moe_shared_experts", "1"], "ernie4_5_moe"),
])
def test_each_moe_format_gives_our_logits(tmp_path, extra, fmt):
    from safetensors.torch import save_file
    ours, mc = random_model(*extra)
    assert moe_format(mc) == fmt
    save_file(moe_to_hf(ours.state_dict(), mc), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text(json.dumps(moe_hf_config(mc)))
    hf = hf_load(tmp_path)
    assert type(hf).__name__ == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                                 "glm4_moe": "Glm4MoeForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}[fmt]
    with torch.no_grad():
        want, got = ours(TOKENS), hf(TOKENS).logits
        assert (got - want).abs().max().item() < 1e-5 and want.std() > 0.1
        if mc.moe_bias_rate:          # the bias matters: without it transformers routes elsewhere
            for layer in hf.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if gate is not None and not isinstance(gate, torch.nn.Linear):
                    (gate.moe_statics if fmt == "ernie4_5_moe" else gate).e_score_correction_bias.zero_()
            assert (hf(TOKENS).logits - want).abs().max().item() > 1e-3
        if mc.moe_shared_experts and fmt == "qwen2_moe":
            # sigmoid(0) = 0.5 times the x2 down projection: the shared expert bit for bit
            x = torch.randn(5, mc.dim, generator=torch.Generator().manual_seed(3))
            block = hf.model.layers[1].mlp
            theirs = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
            assert torch.equal(theirs, ours.layers["1"].feed_forward.shared(x))


@pytest.mark.parametrize("extra, key", [
    (["--model.moe_bias_rate", "1e-3", "--model.moe_norm_topk", "false"],
     "model.moe_norm_topk = false: no Hugging Face MoE format picks experts by softmax"),
    (["--model.moe_router", "sigmoid", "--model.moe_every", "2", "--model.n_layers", "4"],
     r"model.moe_every = 2: a sigmoid router exports to Glm4-MoE, whose dense blocks must come first"),
    (["--model.activation", "gelu"], "model.activation = 'gelu'"),
])
def test_moe_formats_refuse_what_they_cannot_express(extra, key):
    with pytest.raises(CheckpointError, match=key):
        moe_format(config("unused", *MOE, *extra).model)
