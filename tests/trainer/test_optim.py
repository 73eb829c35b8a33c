import math

import pytest

from core.train_config import OptimConfig
from trainer.optim import lr_factor


def test_warmup_then_cosine_to_floor():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    f = [lr_factor(s, 110, cfg) for s in range(110)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0)
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(110, 110, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "cosine"])
def test_wsd_is_constant_then_decays_over_decay_steps(shape):
    cfg = OptimConfig(warmup_steps=5, schedule="wsd", decay_steps=20, decay_shape=shape, min_lr_ratio=0.0)
    f = [lr_factor(s, 100, cfg) for s in range(100)]
    assert all(x == 1.0 for x in f[5:80])
    assert f[99] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(f[80:], f[81:]))
    if shape == "1-sqrt":
        assert f[84] == pytest.approx(1 - math.sqrt(5 / 20))


def test_wsd_prefix_is_independent_of_total_steps():
    """A cooldown branch must see the base run's LR until its own decay starts."""
    cfg = OptimConfig(warmup_steps=5, schedule="wsd", decay_steps=10)
    assert [lr_factor(s, 60, cfg) for s in range(50)] == [lr_factor(s, 200, cfg) for s in range(50)]
