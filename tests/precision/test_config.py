import pytest

from core.run_config import load_config
from core.errors import ConfigError


def test_precision_section_parses_from_overrides():
    cfg = load_config("configs/tiny.toml", ["--precision.dtype", "fp8", "--precision.fp8_recipe", "rowwise",
                                            "--precision.fp8_exclude", "output,layers.0", "--precision.fp8_min_dim", "32"])
    p = cfg.precision
    assert (p.dtype, p.fp8_backend, p.recipe, p.fp8_exclude, p.fp8_min_dim) == ("fp8", "torchao", "rowwise", ["output", "layers.0"], 32)
    # and it round-trips through the saved config.toml
    assert "fp8_recipe" in cfg.to_toml()


def test_auto_recipe_resolves_per_backend():
    assert load_config(None, ["--precision.dtype", "fp8"]).precision.recipe == "tensorwise"
    assert load_config(None, ["--precision.dtype", "fp8", "--precision.fp8_backend", "te"]).precision.recipe == "delayed"


@pytest.mark.parametrize("backend,recipe,other", [("torchao", "delayed", "te"), ("torchao", "mxfp8", "te"),
                                                 ("te", "rowwise", "torchao"), ("te", "tensorwise", "torchao")])
def test_recipe_of_the_other_backend_is_refused(backend, recipe, other):
    with pytest.raises(ConfigError, match=rf"precision.fp8_recipe: '{recipe}' is a recipe of fp8_backend='{other}'"):
        load_config(None, ["--precision.fp8_backend", backend, "--precision.fp8_recipe", recipe])


def test_unknown_recipe_names_the_choices():
    with pytest.raises(ConfigError, match="fp8_recipe"):
        load_config(None, ["--precision.fp8_recipe", "blockwise"])


@pytest.mark.parametrize("extra", [["--precision.fp8_recipe", "rowwise"], ["--precision.fp8_backend", "te"]])
def test_fp8_all_gather_only_with_torchao_tensorwise(extra):
    with pytest.raises(ConfigError, match="fp8_fsdp_all_gather: only the torchao tensorwise"):
        load_config(None, ["--precision.fp8_fsdp_all_gather", "true", *extra])


def test_bad_filter_values():
    with pytest.raises(ConfigError, match="fp8_min_dim"):
        load_config(None, ["--precision.fp8_min_dim", "-1"])
    with pytest.raises(ConfigError, match="fp8_exclude"):
        load_config(None, ["--precision.fp8_exclude", "output,.wo"])
