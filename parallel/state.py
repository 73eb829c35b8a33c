"""Model and optimizer state dicts of `Parallelized.model` under the unsplit model's names.

A rank running several pipeline stages holds them in an nn.ModuleList, so torch's state-dict
helpers name everything "<part>.layers.3...". A checkpoint must not depend on the layout, so
these wrappers drop that part index on the way out and put it back on the way in. Optimizer
state uses torch's flattened form ("state.<param name>.<key>", "param_groups.<param name>.<key>"),
keyed by parameter name, so it is renamed the same way. With one part nothing is renamed.
"""
from __future__ import annotations

from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)
OPT_PREFIXES = ("state.", "param_groups.")


def _split(key: str) -> tuple[str, str]:
    for prefix in OPT_PREFIXES:
        if key.startswith(prefix):
            return prefix, key[len(prefix):]
    return "", key


def _strip(sd: dict) -> dict:
    out = {}
    for key, value in sd.items():
        prefix, rest = _split(key)
        out[prefix + rest.split(".", 1)[1]] = value
    return out


def _owner(model: nn.ModuleList) -> dict[str, int]:
    """Unsplit parameter/buffer name -> index of the part that holds it."""
    return {name: i for i, part in enumerate(model) for name in part.state_dict()}


def _restore(sd: dict, owner: dict[str, int]) -> dict:
    out = {}
    for key, value in sd.items():
        prefix, rest = _split(key)
        name = rest if not prefix else _param_of(rest, owner)
        if name in owner:
            out[f"{prefix}{owner[name]}.{rest}"] = value
    return out


def _param_of(rest: str, owner: dict[str, int]) -> str:
    """'layers.3.attention.wq.weight.exp_avg' -> 'layers.3.attention.wq.weight'."""
    head = rest.rsplit(".", 1)[0]
    return head if head in owner else rest


def state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """(model state, flattened optimizer state), names as in the unsplit model."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=FLAT)
    if isinstance(model, nn.ModuleList):
        return _strip(model_sd), _strip(optim_sd)
    return model_sd, optim_sd


def load_state(model: nn.Module, optimizer, model_sd: dict, optim_sd: dict) -> None:
    if isinstance(model, nn.ModuleList):
        owner = _owner(model)
        model_sd, optim_sd = _restore(model_sd, owner), _restore(optim_sd, owner)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=FLAT)
