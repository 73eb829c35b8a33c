"""muP (model.parametrization = "mup"): the base-width model is the sp model, the multipliers and
per-layer LR groups follow Tensor Programs V Table 3, and the coordinate check is flat under muP
while it grows under sp."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core.model_config import ModelConfig
from core.run_config import load_config
from scaling.mup_plots import log_slope
from tests.precision.markov import MarkovBatches
from trainer.model import Transformer
from trainer.mup_check import coord_check
from trainer.optim import param_groups


def mup(dim: int, **kw) -> ModelConfig:
    return ModelConfig(**{"vocab_size": 320, **kw}, dim=dim, n_heads=4, n_layers=2, parametrization="mup", mup_base_dim=64)


def test_base_width_mup_is_the_sp_model():
    """Every muP factor is 1 at the base width: same init, same logits, bit for bit."""
    sp, mp = Transformer(ModelConfig(dim=64, n_heads=4, n_layers=2, vocab_size=320)), Transformer(mup(64))
    sp.init_weights(5)
    mp.init_weights(5)
    for (k, a), b in zip(sp.state_dict().items(), mp.state_dict().values()):
        assert torch.equal(a, b), k
    tokens = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(sp(tokens), mp(tokens))


def test_width_multipliers():
    """m = 256 / 64 = 4: hidden std / 2, hidden lr / 4, logits x 1/4, attention sqrt(16)/64 (heads
    kept: base head dim 16) or 1/sqrt(16) when widening adds heads (mup_base_head_dim = head_dim)."""
    c = mup(256)
    assert (c.width_mult, c.hidden_init_mult, c.hidden_lr_mult, c.output_mult) == (4.0, 0.5, 0.25, 0.25)
    assert c.attn_scale == pytest.approx(4 / 64)
    assert mup(256, mup_base_head_dim=64).attn_scale == pytest.approx(1 / 8)
    assert ModelConfig().attn_scale is None                     # sp: SDPA's own 1/sqrt(head_dim)
    with pytest.raises(ValueError, match="mup_base_dim"):
        ModelConfig(parametrization="mup").validate()


def test_mup_init_scales_hidden_matrices_only():
    """Hidden matrices' std is init_std / sqrt(m) (wo, w2 also / sqrt(2 n_layers)); embedding and
    readout keep init_std. n >= 65536 draws per matrix: the std's relative standard error is 0.3%,
    so 2% is > 6 standard errors."""
    c = mup(256, vocab_size=256, ffn_hidden=256)
    model = Transformer(c)
    model.init_weights(3)
    for k, v in model.state_dict().items():
        if v.ndim < 2:
            continue
        want = c.init_std
        if k.startswith("layers."):
            want *= 0.5 / (2 * c.n_layers) ** 0.5 if k.endswith(("wo.weight", "w2.weight")) else 0.5
        assert v.std().item() == pytest.approx(want, rel=0.02), k


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_per_layer_type(tied):
    """Hidden matrices: lr / m and weight decay x m (lr * wd unchanged); readout: decayed, lr;
    embeddings, norms: no decay, lr. Group 0 carries the base LR (the one the trainer logs). A
    pipeline stage list (names "0.layers...") gets the same LR per parameter."""
    model = Transformer(ModelConfig(dim=64, n_heads=4, n_layers=2, vocab_size=320, parametrization="mup", mup_base_dim=16,
                                    tie_embeddings=tied))
    groups = param_groups(model, 0.1, 1e-3)
    assert groups[0]["lr"] == 1e-3
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        if name.startswith("layers.") and p.ndim == 2:
            assert lr_of[id(p)] == (0.25e-3, pytest.approx(0.4)), name
        elif name == "output.weight":
            assert lr_of[id(p)] == (1e-3, 0.1), name
        else:
            assert lr_of[id(p)] == (1e-3, 0.0), name
    staged = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(nn.ModuleList([model]), 0.1, 1e-3)
              for p in g["params"]}
    assert staged == lr_of
    sp = param_groups(Transformer(ModelConfig(dim=64, n_heads=4, n_layers=2, vocab_size=320)), 0.1, 1e-3)
    assert [g["weight_decay"] for g in sp] == [0.1, 0.0] and all("lr" not in g for g in sp)


def test_coordinate_check_flat_under_mup_growing_under_sp():
    """Widths 32, 64, 128, 3 Adam steps at lr 1e-2 on a learnable Markov stream (batch 4 x 32).
    Expected slopes of log(mean |activation|) against log(width) after the steps:
    - hidden blocks: sp ~ +1 or more (Adam moves each of a matrix's fan_in entries by ~lr, so the
      update's W x grows like the width, and blocks compound it), muP 0. Observed on this data: sp
      block 0 +0.9, block 1 +1.7; muP -0.07 and -0.07 (and -0.02..+0.02 after 5 steps on the built-in
      corpus: scaling/figures/mup/coord_check.json). Bounds: sp's largest > 0.5 (half of the theory's
      1), muP's within +-0.25 (a quarter of it).
    - logits: sp ~ +1 (observed +0.96). Under muP the update's part is width-independent (slope 0)
      and the init's part decays like m^-1/2 (slope -0.5: the readout's effective std ~ 1/m, Table 3),
      so the slope lies in [-0.5, 0] up to finite-width noise and rises towards 0 as updates take
      over (observed -0.50 at init, -0.08 after 3 steps; -0.51 -> -0.02 on the corpus). Bounds: muP
      in [-0.5, 0.25] and at least 0.2 above its init slope (observed 0.42 above); sp > 0.75 (sp
      starts at +0.5: its init logits grow like sqrt(width))."""
    cfg = load_config("configs/tiny.toml", ["--model.n_layers", "2", "--train.seq_len", "32", "--train.batch_size", "4",
                                            "--train.threads", "1", "--optim.lr", "1e-2"])
    markov = MarkovBatches(320, 32, 4)
    result = coord_check(cfg, [32, 64, 128], 3, ("sp", "mup"), batches=[markov.batch(i) for i in range(4)])
    widths = result["widths"]

    def slope(par, layer, step=3):
        return log_slope(widths, [result["records"][par][layer][str(w)][step] for w in widths])
    blocks = [name for name in result["records"]["sp"] if name.startswith("block")]
    assert max(slope("sp", b) for b in blocks) > 0.5
    assert all(abs(slope("mup", b)) < 0.25 for b in blocks)
    assert slope("sp", "logits") > 0.75
    assert -0.5 <= slope("mup", "logits") <= 0.25
    assert slope("mup", "logits") > slope("mup", "logits", step=0) + 0.2     # the updates take over
