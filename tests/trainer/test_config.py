import pytest

from core.run_config import load_config
from core.errors import ConfigError


def test_defaults_and_overrides_are_typed(tmp_path):
    cfg = load_config("configs/tiny.toml", ["--optim.lr", "1e-3", "--train.steps=7", "--checkpoint.async", "true",
                                           "--model.n_kv_heads", "2", "--checkpoint.at_steps", "[2, 4]"])
    assert cfg.optim.lr == 1e-3 and cfg.train.steps == 7 and cfg.checkpoint.async_save is True
    assert cfg.model.n_kv_heads == 2 and cfg.checkpoint.at_steps == [2, 4]
    assert cfg.model.dim == 128  # from the file
    # the resolved config round-trips through TOML
    p = tmp_path / "c.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides,message", [
    (["--optim.lrr", "1"], "unknown key optim.lrr, did you mean 'lr'"),
    (["--train.step", "1"], "did you mean 'steps'"),
    (["--trian.steps", "1"], "unknown section 'trian'"),
    (["--train.steps", "ten"], "train.steps: expected an integer, got 'ten'"),
    (["--optim.lr", "fast"], "optim.lr: expected a number"),
    (["--model.position", "rotary"], "model.position: 'rotary' is not allowed; expected one of"),
    (["--model.n_kv_heads", "3"], "model.n_kv_heads: 3 must divide model.n_heads=4"),
    (["--model.dim", "130"], "model.dim: 130 is not divisible by model.n_heads=4"),
    (["--train.seq_len", "4096"], "train.seq_len: 4096 exceeds model.max_seq_len=512"),
    (["--train.batch_size", "0"], "train.batch_size: must be >= 1"),
    (["--optim.lr"], "needs a value"),
    (["steps", "3"], "expected an override like"),
])
def test_bad_input_names_the_field(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.toml", overrides)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    bad.write_text("[modle]\ndim = 3\n")
    with pytest.raises(ConfigError, match="unknown section \\[modle\\], did you mean 'model'"):
        load_config(bad)
    bad.write_text("[model]\ndim = 'wide'\n")
    with pytest.raises(ConfigError, match="model.dim: expected an integer"):
        load_config(bad)


@pytest.mark.parametrize("path", ["configs/tiny.toml", "configs/llama3-1b.toml", "configs/llama3-8b.toml",
                                  "configs/llama3-70b.toml", "configs/gpt2-124m.toml"])
def test_presets_load_with_published_sizes(path):
    cfg = load_config(path)
    n = cfg.model.num_params()
    expected = {"tiny": 0.935e6, "llama3-1b": 1.236e9, "llama3-8b": 8.03e9, "llama3-70b": 70.55e9, "gpt2-124m": 124.5e6}
    name = path.split("/")[-1][:-5]
    assert abs(n - expected[name]) / expected[name] < 0.01, (name, n)


def test_list_values_from_the_command_line():
    load = lambda v: load_config(None, ["--data.urls", v]).data.urls  # noqa: E731
    assert load("a.tar,b.tar") == ["a.tar", "b.tar"]
    assert load("shard-{000..009}.tar") == ["shard-{000..009}.tar"]
    assert load("x/{a,b}.tar,y.tar") == ["x/{a,b}.tar", "y.tar"]
    assert load('["p,q.tar"]') == ["p,q.tar"]
