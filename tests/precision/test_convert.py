import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from trainer.model import Transformer
from core.model_config import ModelConfig
from parallel.precision import (autocast_context, convert_for_training, fp8_module_filter, fp8_module_names,
                               fsdp_mixed_precision, post_optimizer_hook)
from core.precision_config import PrecisionConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, max_seq_len=32)
PER_LAYER = ["attention.wq", "attention.wk", "attention.wv", "attention.wo", "feed_forward.w1", "feed_forward.w2",
             "feed_forward.w3"]


def model(**kw):
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **kw}))


def test_filter_keeps_excluded_names_odd_dims_and_small_layers_in_high_precision():
    keep = fp8_module_filter(PrecisionConfig(dtype="fp8", fp8_exclude=["output", "attention.wo", "layers.1"]))
    assert keep(nn.Linear(64, 192), "layers.0.feed_forward.w1")
    assert not keep(nn.Linear(64, 320), "output")
    assert not keep(nn.Linear(64, 64), "layers.0.attention.wo")
    assert not keep(nn.Linear(64, 64), "layers.1.attention.wq")
    assert keep(nn.Linear(64, 64), "layers.10.attention.wq")       # layers.1 is a name part, not a prefix string
    assert not keep(nn.Linear(40, 64), "layers.0.attention.wq")     # 40 is no multiple of 16
    assert not keep(nn.Linear(64, 72), "layers.0.attention.wq")
    assert not keep(nn.Embedding(64, 64), "tok_embeddings")
    small = fp8_module_filter(PrecisionConfig(dtype="fp8", fp8_min_dim=128))
    assert not small(nn.Linear(64, 192), "layers.0.feed_forward.w1") and small(nn.Linear(128, 256), "x")


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_torchao_converts_the_block_linears_and_keeps_the_state_dict(recipe):
    ref = model()
    m = convert_for_training(model(), PrecisionConfig(dtype="fp8", fp8_recipe=recipe))
    assert fp8_module_names(m) == [f"layers.{i}.{n}" for i in range(2) for n in PER_LAYER]
    assert type(m.output) is nn.Linear
    # same names, shapes and fp32 dtypes: checkpoints move freely between precisions
    sd, ref_sd = m.state_dict(), ref.state_dict()
    assert list(sd) == list(ref_sd)
    assert all(sd[k].dtype == torch.float32 and torch.equal(sd[k], ref_sd[k]) for k in sd)
    ref.load_state_dict(m.state_dict())
    m.load_state_dict(ref.state_dict())
    # fp8 quantisation changes the numbers a little, not a lot
    x = torch.randint(0, 320, (2, 32))
    with torch.no_grad():
        a, b = ref(x), m(x)
    err = ((a - b).norm() / a.norm()).item()
    assert 1e-4 < err < 0.1, err
    # gradients reach every parameter, in fp32
    m(x).float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in m.parameters())


def test_conversion_is_idempotent_and_a_no_op_for_other_dtypes():
    m = convert_for_training(model(), PrecisionConfig(dtype="fp8"))
    layer = m.layers["0"].attention.wq
    assert convert_for_training(m, PrecisionConfig(dtype="fp8")).layers["0"].attention.wq is layer
    for dtype in ("fp32", "bf16"):
        plain = model()
        assert convert_for_training(plain, PrecisionConfig(dtype=dtype)) is plain and not fp8_module_names(plain)


def test_no_qualifying_layer_is_a_clear_error():
    with pytest.raises(ValueError, match="no linear layer qualifies for fp8"):
        convert_for_training(model(dim=40, n_heads=4), PrecisionConfig(dtype="fp8"))


def test_te_backend_errors_clearly_without_cuda_or_package():
    with pytest.raises(RuntimeError) as e:
        convert_for_training(model(), PrecisionConfig(dtype="fp8", fp8_backend="te"))
    msg = str(e.value)
    assert "precision.fp8_backend=te needs" in msg and "a CUDA device" in msg
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        assert "transformer_engine package" in msg
    assert "fp8_backend=torchao" in msg          # says what would work instead


def test_transformer_engine_is_imported_only_when_asked_for():
    code = ("import sys, parallel.precision, trainer.train, parallel.local_engine\n"
            "from parallel.precision import convert_for_training\n"
            "from core.precision_config import PrecisionConfig\n"
            "from trainer.model import Transformer\nfrom core.model_config import ModelConfig\n"
            "convert_for_training(Transformer(ModelConfig(vocab_size=320, dim=64, n_layers=1)), PrecisionConfig(dtype='fp8'))\n"
            "assert not any(m.startswith('transformer_engine') for m in sys.modules), 'imported TE'\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_autocast_and_fsdp_policy_per_mode():
    cpu = torch.device("cpu")
    m = model()
    assert not isinstance(autocast_context(cpu, "fp32", "autocast", m), torch.autocast)
    for dtype in ("bf16", "fp8"):
        ctx = autocast_context(cpu, dtype, "autocast", m)
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16
        # params mode without FSDP: nothing would cast the weights, so it falls back to autocast
        assert isinstance(autocast_context(cpu, dtype, "params", m), torch.autocast)
    assert fsdp_mixed_precision(PrecisionConfig(dtype="bf16")) is None
    assert fsdp_mixed_precision(PrecisionConfig(dtype="fp32", bf16_mode="params")) is None
    policy = fsdp_mixed_precision(PrecisionConfig(dtype="fp8", bf16_mode="params"))
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)


def test_post_optimizer_hook_leaves_an_unsharded_model_alone():
    m = convert_for_training(model(), PrecisionConfig(dtype="fp8"))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    post_optimizer_hook([m])
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
