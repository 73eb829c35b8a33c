"""The run folder is enough (issue 18): `meshformer generate RUN_DIR` and `meshformer export RUN_DIR
OUT` find config, tokenizer and checkpoint there, also after the folder moved and the original
tokenizer file is gone; the export loads in transformers' AutoTokenizer, AutoModelForCausalLM and
text-generation pipeline, which encode and greedily generate exactly what we do."""
import shutil
import tomllib

import pytest
import torch

from core.run_config import load_config
from data.prepare import write_shards
from trainer.cli import main
from trainer.generate import generate
from trainer.run_folder import TOKENIZER_FILE, load_run_config, run_tokenizer

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# Text with multi-byte characters, so the byte tables and BPE merges are exercised past ASCII.
DOCS = [f"def f{i}(x):\n    return x * {i} + 1  # héllo wörld – 日本 {i % 7}\n" for i in range(400)]
SAMPLES = ["def g(y):\n\treturn y", "naïve café – ünïcödé 日本語 🎉", "  two  spaces .,;", "<|endoftext|>x"]
PROMPT, NEW = "def f", 24
# 100 steps (~2 s) teach this model enough that greedy decoding writes varied code, not one
# repeated token; the epoch (~190 steps) does not end within them.
SMALL = ["--model.dim", "64", "--model.n_layers", "2", "--model.n_heads", "2", "--model.n_kv_heads", "1",
         "--model.max_seq_len", "64", "--train.seq_len", "32", "--train.batch_size", "4", "--train.steps", "100",
         "--train.eval_every", "0", "--optim.warmup_steps", "5", "--optim.lr", "1e-2", "--metrics.log_every", "100",
         "--metrics.progress", "false", "--metrics.tensorboard", "false", "--train.threads", "1"]


def train_bpe(path) -> str:
    """A tiny byte-level BPE (GPT-2 style) trained on the corpus, with <|endoftext|>."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="module", params=["bytes", "bpe", "pretokenized-bpe"])
def moved_run(request, tmp_path_factory):
    """A short run with the real loader, then moved elsewhere with its tokenizer file deleted.
    pretokenized-bpe: shards prepared with the BPE, trained with data.tokenizer = 'pretokenized'
    (the issue's case: the run's config.toml then named the tokenizer only by its hash)."""
    from trainer.train import train
    w = tmp_path_factory.mktemp(request.param)
    spec = "bytes" if request.param == "bytes" else f"hf:{train_bpe(w / 'bpe.json')}"
    write_shards((d.encode() for d in DOCS), str(w / "shards"), tokenizer=spec)
    used = "pretokenized" if request.param.startswith("pretokenized") else spec
    train(load_config("configs/tiny.toml", SMALL + ["--run.dir", str(w / "run"), "--data.urls", str(w / "shards"),
                                                    "--data.tokenizer", used]))
    saved = tomllib.loads((w / "run" / "config.toml").read_text())["data"]["tokenizer"]
    if spec == "bytes":
        assert saved == "bytes" and not (w / "run" / TOKENIZER_FILE).exists()
    else:       # the run's own copy; config.toml names it through run.dir (no path outside the run folder)
        assert saved == ("pretokenized" if used == "pretokenized" else f"hf:{w / 'run' / TOKENIZER_FILE}")
        assert (w / "run" / TOKENIZER_FILE).read_bytes() == (w / "bpe.json").read_bytes()
        (w / "bpe.json").unlink()
    shutil.move(str(w / "run"), str(w / "moved"))
    return w / "moved", used


def test_generate_and_export_from_the_run_folder_agree_with_transformers(moved_run, tmp_path, capsys):
    run, spec = moved_run
    cfg = load_run_config(str(run), [])
    ours = run_tokenizer(cfg)
    assert ours.spec == ("bytes" if spec == "bytes" else f"hf:{run / TOKENIZER_FILE}")

    out = tmp_path / "hf"
    assert main(["export", str(run), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"exported checkpoint {run}/checkpoints/step-00000100 (step 100) to {out}; tokenizer" in said

    # the tokenizer: same ids for text (multi-byte characters, spaces, the end-of-text string), same text back
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok.eos_token_id == ours.eot_id
    for text in SAMPLES + DOCS[:3]:
        ids = hf_tok(text).input_ids
        assert ids == ours.encode(text), text
        assert hf_tok.decode(ids) == ours.decode(ids), text

    # greedy generation: `meshformer generate RUN_DIR --temperature 0` prints what the pipeline returns
    assert main(["generate", str(run), "--prompt", PROMPT, "--tokens", str(NEW), "--temperature", "0"]) == 0
    got = capsys.readouterr()
    assert got.err.strip() == f"meshformer generate: checkpoint {run}/checkpoints/step-00000100 (step 100)"
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe(PROMPT, max_new_tokens=NEW, do_sample=False)[0]["generated_text"]
    assert got.out == text + "\n"

    # ... and the same token ids, from our model and from AutoModelForCausalLM
    from trainer.checkpoint import load_model_weights
    from trainer.model import Transformer
    model = Transformer(cfg.model)
    load_model_weights(model, run / "checkpoints" / "step-00000100")
    prompt = torch.tensor([ours.encode(PROMPT)])
    want = generate(model, prompt, NEW, temperature=0, eot_id=ours.eot_id)[0].tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    have = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False)[0].tolist()
    assert have == want
    assert len(set(want[prompt.shape[1]:])) > 1          # not one token repeated: the weights say something


def test_generate_picks_a_checkpoint_and_a_config_still_works(moved_run, tmp_path, capsys):
    run, spec = moved_run
    assert main(["generate", str(run), "--checkpoint", "step-100", "--tokens", "4", "--temperature", "0",
                 "--prompt", "x"]) == 0
    by_step = capsys.readouterr()
    assert "(step 100)" in by_step.err
    # --config + overrides as before; the run's own config.toml is a config like any other
    args = ["generate", "--config", str(run / "config.toml"), "--run.dir", str(run), "--tokens", "4",
            "--temperature", "0", "--prompt", "x"]
    if spec.startswith("hf:"):   # the saved path names the folder before the move: point it at the moved copy
        args += ["--data.tokenizer", f"hf:{run / TOKENIZER_FILE}"]
    assert main(args) == 0
    assert capsys.readouterr().out == by_step.out
    if spec == "pretokenized":
        a_run_without_its_tokenizer_is_named_not_crashed(run, tmp_path, capsys)


def a_run_without_its_tokenizer_is_named_not_crashed(run, tmp_path, capsys):
    """A pre-tokenized run from before the copy, whose tokenizer file is gone: generate says what
    to give, export writes the weights and says it wrote no tokenizer."""
    bare = tmp_path / "bare"
    shutil.copytree(run, bare)
    (bare / TOKENIZER_FILE).unlink()
    assert main(["generate", str(bare)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--data.tokenizer hf:/path/tokenizer.json" in err and str(bare) in err
    assert main(["export", str(bare), str(tmp_path / "out")]) == 0
    assert "no tokenizer files" in capsys.readouterr().out
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_generate_help_describes_every_option_with_its_default():
    from trainer.generate import parser
    for action in parser()._actions:
        if action.dest != "help":
            assert action.help and "default" in action.help, action.dest
    text = " ".join(parser().format_help().split())
    assert "--temperature T sampling temperature; 0 = greedy: always the likeliest token (default: 0.8)" in text
    assert "(default: 'def ')" in text and "(default: 200)" in text and "(default: 40)" in text
