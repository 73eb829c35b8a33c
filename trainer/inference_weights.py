"""Weights for inference: a dtype (fp32, bf16) and optional weight-only quantization through
torchao (int8, fp8), and how many bytes a decode step reads from memory.

Weight-only quantization stores each Linear's weight as int8 (or float8 e4m3) with one scale per
output row and dequantizes on the fly; activations and the KV cache keep the model's dtype. The
embedding table stays as it is (a decode step reads only its B rows).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from core.errors import UsageError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QUANTIZE = ("none", "int8", "fp8")


def _torchao_quantizer(kind: str):
    """(torchao's quantize_, its weight-only config for `kind`); torchao is optional (the fp8
    extra), so it is imported when asked for, as parallel/precision.py does."""
    # at import torchao lists the CUDA kernels it cannot load on a CPU host, and torch warns about
    # one of its enums: noise for weight-only quantization, silenced for the import only
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [q.level for q in quiet]
    for q in quiet:
        q.setLevel(logging.ERROR)
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise UsageError(f"--quantize {kind} needs torchao (pip install 'torchao>=0.18,<0.19'): {e}") from None
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return quantize_, Int8WeightOnlyConfig() if kind == "int8" else Float8WeightOnlyConfig()


def prepare_weights(model: nn.Module, dtype: str = "fp32", quantize: str = "none") -> nn.Module:
    """Cast `model` to `dtype` and quantize its Linear weights in place (`quantize` != 'none')."""
    if dtype not in DTYPES:
        raise UsageError(f"--dtype: {dtype!r}; give one of {', '.join(DTYPES)}")
    if quantize not in QUANTIZE:
        raise UsageError(f"--quantize: {quantize!r}; give one of {', '.join(QUANTIZE)}")
    model.to(DTYPES[dtype]).eval()
    if quantize != "none":
        quantize_, config = _torchao_quantizer(quantize)
        try:
            quantize_(model, config)
        except (RuntimeError, NotImplementedError, AssertionError) as e:
            raise UsageError(f"--quantize {quantize}: torchao cannot quantize on this backend "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "use --quantize int8 or none") from None
    return model


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor occupies as stored: a quantized tensor subclass counts its inner tensors
    (int8 data, scales, zero points), not the dtype it pretends to be."""
    if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and type(t) is not nn.Parameter:
        names, _ = t.__tensor_flatten__()
        return sum(stored_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def weight_bytes_per_step(model: nn.Module, batch: int) -> int:
    """Bytes of weights one decode step of `batch` rows reads: every weight once (however many
    rows share it), except the input embedding, of which only the looked-up rows."""
    total, seen = 0, set()
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, nn.Embedding):
                total += min(batch, p.shape[0]) * stored_bytes(p) // p.shape[0]
            else:
                total += stored_bytes(p)
    return total


def kv_bytes_per_position(model: nn.Module, batch: int) -> int:
    """Bytes of keys and values cached per position for `batch` rows, in the activation dtype."""
    c = model.cfg
    act = model.norm.weight.dtype if model.norm is not None else torch.float32
    return 2 * c.n_layers * c.kv_heads * c.head_dim * batch * torch.empty((), dtype=act).element_size()
