"""Export to Hugging Face Llama and import back: same logits, clear refusals."""
import dataclasses
import json

import pytest
import torch

from tests.checkpoint.helpers import config, run
from trainer.checkpoint_state import CheckpointError
from trainer.export import main as export_main
from trainer.model import Transformer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of training, so weights are no longer the symmetric initialisation."""
    d = tmp_path_factory.mktemp("exp") / "run"
    run(d, "--train.steps", "3")
    return d


def our_model(run_dir, *extra):
    from trainer.checkpoint import complete_checkpoints, load_model_weights
    cfg = config(run_dir, *extra)
    model = Transformer(cfg.model).eval()
    load_model_weights(model, complete_checkpoints(run_dir / "checkpoints")[-1])
    return model, cfg


def test_exported_model_gives_our_logits_in_transformers(trained, tmp_path):
    out = tmp_path / "hf"
    assert export_main([str(trained), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["num_key_value_heads"] == 2 and config["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ours, _ = our_model(trained)
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5
    assert want.std() > 0.1                          # not a trivially flat output


def test_training_starts_from_exported_weights(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    assert export_main([str(trained), "--out", str(out)]) == 0
    summary, rows = run(tmp_path / "new", "--train.steps", "1", "--checkpoint.init_from", str(out))
    assert "initialised weights from" in capsys.readouterr().out
    assert [r["step"] for r in rows if "loss" in r] == [1]           # step 0: fresh optimizer and schedule
    # the model before the first step equals the exported one: check through a no-step run
    from trainer.hf_llama import find_weights_files, load_weights
    cfg = config(tmp_path / "x")
    sd = load_weights(find_weights_files(out), cfg.model)
    ours, _ = our_model(trained)
    for k, v in ours.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_import_refuses_a_different_shape(trained, tmp_path):
    out = tmp_path / "hf"
    export_main([str(trained), "--out", str(out)])
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        run(tmp_path / "n", "--train.steps", "1", "--model.n_layers", "3", "--checkpoint.init_from", str(out))
    (out / "config.json").unlink()          # a bare safetensors file: checked tensor by tensor
    with pytest.raises(CheckpointError, match="missing: model.layers.2"):
        run(tmp_path / "m", "--train.steps", "1", "--model.n_layers", "3",
            "--checkpoint.init_from", str(out / "model.safetensors"))


def test_export_refuses_non_llama_models_and_bad_paths(tmp_path, capsys):
    d = tmp_path / "gelu"
    run(d, "--train.steps", "1", "--model.activation", "gelu")
    assert export_main([str(d), "--out", str(tmp_path / "o")]) == 2
    assert "model.activation = 'gelu' (Llama needs 'swiglu')" in capsys.readouterr().err
    assert export_main([str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_export_does_not_overwrite(trained, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert export_main([str(trained), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "keep me"


# muP: m = 32 / 8 = 4, so the folded factors (logits x 1/4; q x sqrt(base head dim 2) / 8 x sqrt(8) = 1/2)
# are powers of two and the round trip export -> import is exact
MUP = ("--model.parametrization", "mup", "--model.mup_base_dim", "8")


@pytest.mark.parametrize("extra", [MUP, MUP + ("--model.tie_embeddings", "true")], ids=["mup", "mup_tied"])
def test_mup_export_folds_the_multipliers(tmp_path, extra):
    """HF Llama has no logit multiplier and scales scores by 1/sqrt(head_dim): the export folds
    muP's 1/m and sqrt(base)/head_dim into lm_head and q_proj, so transformers gives our logits
    (same tolerance as the sp export), and importing the export gives back our weights exactly."""
    from trainer.hf_llama import find_weights_files, load_weights
    d = tmp_path / "run"
    run(d, "--train.steps", "3", "--optim.lr", "0.03", *extra)    # a high LR: sharp attention, so that an
    out = tmp_path / "hf"                                           # unfolded scale shows in the logits
    assert export_main([str(d), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False       # a tied muP head is written untied (lm_head = E / m)
    hf = transformers.LlamaForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ours, cfg = our_model(d, *extra)
    assert cfg.model.output_mult == 0.25 and ours.layers["0"].attention.scale != 8 ** -0.5
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
    assert (got - want).abs().max().item() < 1e-5
    assert want.std() > 0.03                          # not a trivially flat output (muP logits are small)
    sd = load_weights(find_weights_files(out), cfg.model)
    for k, v in ours.state_dict().items():
        assert torch.equal(sd[k], v), k


def test_sliding_window_exports_as_mistral_or_qwen2_and_doc_mask_as_is(tmp_path):
    """A windowed (every layer) doc_mask model: transformers' Mistral gives our logits (same 1e-5
    as the Llama export) on a sequence 4x the window, where the window changes the result; with
    global layers it is Qwen2 (layer_types, zero q/k/v biases), same logits, and imports back exactly."""
    from trainer.hf_llama import find_weights_files, load_weights
    d, extra = tmp_path / "run", ("--model.attn_window", "4", "--model.doc_mask", "true")
    run(d, "--train.steps", "3", *extra)
    out = tmp_path / "hf"
    assert export_main([str(d), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["sliding_window"] == 4
    hf = transformers.MistralForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    ours, cfg = our_model(d, *extra)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))   # one document: no eot
    with torch.no_grad():
        want = ours(tokens)
        got = hf(tokens).logits
        unwindowed = Transformer(dataclasses.replace(cfg.model, attn_window=0)).eval()
        unwindowed.load_state_dict(ours.state_dict())
        full = unwindowed(tokens)
    assert (got - want).abs().max().item() < 1e-5
    assert (full - want).abs().max().item() > 1e-3          # the window matters at this length
    d2, extra2 = tmp_path / "run2", (*extra, "--model.attn_global_every", "2")
    run(d2, "--train.steps", "3", *extra2)
    assert export_main([str(d2), "--out", str(tmp_path / "hf2")]) == 0
    config = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert config["layer_types"] == ["sliding_attention", "full_attention"]
    hf = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "hf2"), torch_dtype=torch.float32).eval()
    ours, cfg = our_model(d2, *extra2)
    unwindowed = Transformer(dataclasses.replace(cfg.model, attn_window=0, attn_global_every=0)).eval()
    unwindowed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert (hf(tokens).logits - ours(tokens)).abs().max().item() < 1e-5
        assert (unwindowed(tokens) - ours(tokens)).abs().max().item() > 1e-3
    back = load_weights(find_weights_files(tmp_path / "hf2"), cfg.model)
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items() if k in back)
