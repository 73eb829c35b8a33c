"""Training precision as configuration: fp32, bf16 (autocast or FSDP mixed precision), fp8.

The model file knows nothing of fp8. `convert_for_training` swaps its linear layers for fp8 ones
(torchao `Float8Linear`, or transformer-engine `te.Linear` under TE's fp8 autocast); parallel/apply.py
calls it after tensor parallel and before activation checkpointing, compile and FSDP. Parameters
stay in their high-precision dtype, so state dicts keep their names and dtypes: a checkpoint saved
under fp8 loads under bf16 or fp32 and back.

What the rest of the trainer calls:
  convert_for_training(model, cfg, tp_mesh)  once, in parallelize() (idempotent)
  fsdp_mixed_precision(cfg)                  the MixedPrecisionPolicy for fully_shard (or None)
  autocast_context(device, dtype, mode, model)  around each forward (LocalEngine.autocast)
  post_optimizer_hook(model_parts)           after each optimizer.step() (fp8 all-gather scales)
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import sys
from typing import Callable

import torch
from torch import nn

from core.precision_config import PrecisionConfig

# ---- which linear layers go to fp8 -------------------------------------------------------------


def _name_matches(fqn: str, name: str) -> bool:
    """`name` is the whole dotted path, a prefix, a suffix or a run of its dotted parts."""
    return f".{name}." in f".{fqn}."


def _local_shape(weight: torch.Tensor) -> tuple[int, ...]:
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    return tuple(local.shape)


def fp8_module_filter(cfg: PrecisionConfig) -> Callable[[nn.Module, str], bool]:
    """True for the linear layers to convert: not excluded by name, every dim (global and, under
    tensor parallel, local) a multiple of 16 (the fp8 GEMM's requirement) and >= fp8_min_dim."""
    def keep_fp8(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(_name_matches(fqn, name) for name in cfg.fp8_exclude):
            return False
        dims = (module.in_features, module.out_features) + _local_shape(module.weight)
        return all(d % 16 == 0 for d in dims) and min(dims) >= cfg.fp8_min_dim
    return keep_fp8


def fp8_module_names(model: nn.Module) -> list[str]:
    """Names of the modules that run their matmul in fp8 (for logs and tests)."""
    return [name for name, m in model.named_modules() if _is_fp8_module(m)]


def _is_fp8_module(m: nn.Module) -> bool:
    cls = type(m)
    return cls.__name__ == "Float8Linear" or cls.__module__.startswith("transformer_engine")


# ---- the conversion ---------------------------------------------------------------------------


def convert_for_training(model: nn.Module, cfg: PrecisionConfig, tp_mesh=None) -> nn.Module:
    """Swap eligible linear layers for fp8 ones when cfg.dtype == "fp8"; otherwise return the model
    as is (bf16 is applied by autocast or FSDP's policy, see below). Converting twice is a no-op,
    so train.py and parallelize() may both call it. `tp_mesh`: the tensor-parallel mesh when
    tensor parallel was applied before (weights are DTensors then)."""
    if cfg.dtype != "fp8" or any(_is_fp8_module(m) for m in model.modules()):
        return model
    if cfg.fp8_backend == "torchao":
        _convert_torchao(model, cfg)
    else:
        _convert_te(model, cfg, tp_mesh)
    if not fp8_module_names(model):
        raise ValueError("precision.dtype=fp8: no linear layer qualifies for fp8 (dims must be multiples of 16 and "
                         f">= precision.fp8_min_dim={cfg.fp8_min_dim}, names not in precision.fp8_exclude="
                         f"{cfg.fp8_exclude}); use bf16 or relax the filter")
    return model


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    if p is None or p.device.type == "meta":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return p.device


def has_fp8_gemm(device: torch.device) -> bool:
    """fp8 tensor cores: CUDA compute capability 8.9 (Ada) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _convert_torchao(model: nn.Module, cfg: PrecisionConfig) -> None:
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise RuntimeError("precision.fp8_backend=torchao needs the torchao package (pip install torchao), "
                           f"which could not be imported: {e}") from None
    config = Float8LinearConfig.from_recipe_name(cfg.recipe)
    # Without fp8 tensor cores (a CPU, or a GPU older than Ada) torchao's emulation casts to fp8 and
    # back exactly as on the GPU but multiplies in high precision: torch._scaled_mm on CPU is a
    # reference kernel ~30x slower than a bf16 matmul. The numbers (quantisation error) are the same.
    emulate = not has_fp8_gemm(_model_device(model))
    config = dataclasses.replace(config, emulate=emulate, enable_fsdp_float8_all_gather=cfg.fp8_fsdp_all_gather)
    before = dict(model.named_modules())
    convert_to_float8_training(model, config=config, module_filter_fn=fp8_module_filter(cfg))
    for name, new in model.named_modules():
        if name in before and before[name] is not new:
            _carry_hooks(before[name], new)


_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def _carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Keep the forward hooks of a swapped layer: tensor parallel's input/output redistribution
    lives in hooks on the nn.Linear it was applied to, and torchao's swap would drop them."""
    for attr in _HOOK_DICTS:
        if getattr(old, attr, None):
            getattr(new, attr).update(getattr(old, attr))


# ---- transformer-engine (CUDA only, imported lazily) -------------------------------------------


def import_transformer_engine(device: torch.device):
    """transformer_engine.pytorch, or a RuntimeError that says what is missing."""
    missing = []
    if device.type != "cuda" or not torch.cuda.is_available():
        missing.append(f"a CUDA device (this process trains on {device.type!r}"
                       f"{'' if torch.cuda.is_available() else ' and torch sees no GPU'})")
    try:
        import transformer_engine.pytorch as te
    except Exception as e:  # ImportError, or OSError/RuntimeError when CUDA/cuDNN libraries are absent
        te = None
        missing.append(f"the transformer_engine package (pip install transformer-engine[pytorch]; import failed: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if missing:
        raise RuntimeError("precision.fp8_backend=te needs " + " and ".join(missing) +
                           "; use precision.fp8_backend=torchao (runs anywhere) or precision.dtype=bf16")
    return te


def te_recipe(cfg: PrecisionConfig, device: torch.device):
    from transformer_engine.common import recipe as r
    if cfg.recipe == "delayed":
        return r.DelayedScaling(fp8_format=r.Format.HYBRID, amax_history_len=cfg.fp8_amax_history,
                                amax_compute_algo="max")
    if cfg.recipe == "current":
        if not hasattr(r, "Float8CurrentScaling"):
            raise RuntimeError("precision.fp8_recipe=current needs transformer-engine >= 2.2 (Float8CurrentScaling)")
        return r.Float8CurrentScaling(fp8_format=r.Format.HYBRID)
    if torch.cuda.get_device_capability(device) < (10, 0) or not hasattr(r, "MXFP8BlockScaling"):
        raise RuntimeError(f"precision.fp8_recipe=mxfp8 needs a Blackwell GPU (compute capability >= 10.0; this is "
                           f"{torch.cuda.get_device_name(device)}) and transformer-engine >= 2.0; use delayed or current")
    return r.MXFP8BlockScaling()


def te_autocast_factory(te, recipe) -> Callable[[], contextlib.AbstractContextManager]:
    """TE's fp8 autocast across its API rename (fp8_autocast(fp8_recipe=) -> autocast(recipe=))."""
    auto = getattr(te, "autocast", None)
    if auto is not None and "recipe" in inspect.signature(auto).parameters:
        return lambda: auto(enabled=True, recipe=recipe)
    return lambda: te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def _convert_te(model: nn.Module, cfg: PrecisionConfig, tp_mesh) -> None:
    device = _model_device(model)
    te = import_transformer_engine(device)
    if tp_mesh is not None:
        raise NotImplementedError("precision.fp8_backend=te with parallel.tp > 1: TE brings its own tensor parallel, "
                                  "which meshformer does not drive yet; use precision.fp8_backend=torchao with tp")
    keep = fp8_module_filter(cfg)
    targets = [(name, m) for name, m in model.named_modules() if keep(m, name)]
    for name, old in targets:
        new = te.Linear(old.in_features, old.out_features, bias=old.bias is not None,
                        params_dtype=old.weight.dtype, device=old.weight.device)
        with torch.no_grad():
            new.weight.copy_(old.weight)
            if old.bias is not None:
                new.bias.copy_(old.bias)
        _carry_hooks(old, new)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    # TE layers read the fp8 state from an enclosing autocast: wrap the model's forward in it (as
    # accelerate does), so the engine and the state-dict names stay as they are.
    context = te_autocast_factory(te, te_recipe(cfg, device))
    inner = model.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        with context():
            return inner(*args, **kwargs)
    model.forward = forward


# ---- bf16: autocast, or FSDP's mixed-precision policy ---------------------------------------------


def uses_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return any(isinstance(m, FSDPModule) for m in model.modules())


def fsdp_mixed_precision(cfg: PrecisionConfig):
    """The policy for fully_shard: bf16 parameters for compute, fp32 sharded master weights (what the
    optimizer steps) and fp32 gradient reduction; None (fp32 throughout) unless bf16_mode=params."""
    if cfg.dtype == "fp32" or cfg.bf16_mode != "params":
        return None
    from torch.distributed.fsdp import MixedPrecisionPolicy
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def autocast_context(device: torch.device, dtype: str, mode: str = "autocast", model: nn.Module | None = None):
    """The context around a forward pass. bf16 and fp8 run the non-fp8 ops in bf16 by torch.autocast
    over fp32 weights; in `params` mode FSDP already casts the parameters to bf16, so nothing is
    needed there. Without FSDP, `params` falls back to autocast (as torchtitan does): a
    single process or DDP keeps fp32 master weights and reductions and computes in bf16 either way."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    if mode == "params" and model is not None and uses_fsdp(model):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


# ---- after the optimizer step ---------------------------------------------------------------------


def post_optimizer_hook(model_parts: list[nn.Module]) -> None:
    """Recompute the fp8 scales of FSDP-sharded torchao weights with one all-reduce, so the next
    all-gather sends fp8 (precision.fp8_fsdp_all_gather). Does nothing for any other model."""
    if "torchao.float8" not in sys.modules:
        return
    from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp
    for part in model_parts:
        precompute_float8_dynamic_scale_for_fsdp(part)
