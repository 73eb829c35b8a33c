"""Materialise a model built on the meta device and fill only this rank's shards.

The trainer builds the model on the meta device (no memory), `parallelize` splits and shards it
there, and only then are parameters allocated, at their local (sharded) size: a rank never holds
the whole model. Values come from a `ValueFn` supplied by the model side: the FULL initial tensor
of one parameter, given its name in the unsplit model, its global shape, device and dtype. Each
rank asks for every parameter it holds, one at a time, and keeps its own piece, so the extra
memory is one parameter, not the model; and since the value depends on nothing but the name and
shape, one process and every layout start from the same weights.

Why the full tensor and not only the local slice: torch's CPU generator is not counter-based (a
Mersenne twister feeding vectorised Box-Muller blocks), so the numbers of rows i..j cannot be
drawn without drawing rows 0..i first; the slice of a full draw is the only way a shard equals the
single-process value. The same path writes weights read from a file (checkpoint.init_from).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

# (fqn in the unsplit model, global shape, device, dtype) -> the full tensor; a pure function of
# its arguments (a random one: one generator per fqn), so every rank draws the same values
ValueFn = Callable[[str, torch.Size, torch.device, torch.dtype], torch.Tensor]


@dataclass(frozen=True)
class ParamInit:
    """How `parallelize` turns a meta-device model into real, initialised local shards."""
    device: torch.device
    value: ValueFn


def is_meta(module: nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters())


def _tied_slots(module: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, name) slots that hold one Parameter object (a tied head)."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                slots.setdefault(id(p), []).append((mod, name))
    return [group for group in slots.values() if len(group) > 1]


def materialize(module: nn.Module, device: torch.device) -> None:
    """Allocate the meta parameters of `module` (plain, TP or FSDP DTensors) at their local size on
    `device`, values undefined. Buffers that are already real (position tables, TP-sliced ALiBi
    slopes: computed before sharding, small) are kept: `to_empty` would replace them with garbage.
    Tied parameters stay one object: `to_empty` gives each module slot its own new Parameter."""
    buffers = [(mod, name, b) for mod in module.modules() for name, b in mod._buffers.items()
               if b is not None and not b.is_meta]
    ties = _tied_slots(module)
    module.to_empty(device=device)     # FSDP2's _apply hook re-registers its padded shards
    for mod, name, b in buffers:
        mod._buffers[name] = b
    for (first, first_name), *rest in ties:
        p = getattr(first, first_name)
        for mod, name in rest:
            if getattr(mod, name) is not p:
                setattr(mod, name, p)


def local_piece(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the global tensor `full`, laid out like `param`. For a DTensor,
    distribute_tensor with src_data_rank=None slices locally (every rank holds `full`; no
    communication), with the same chunking as TP's styles and FSDP2 (torch.chunk, uneven last)."""
    if isinstance(param, DTensor):
        return distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None).to_local()
    return full


@torch.no_grad()
def fill_local_shards(parts: Iterable[nn.Module], value: ValueFn, device: torch.device | None = None) -> list[str]:
    """Copy each parameter's local piece of `value(fqn, ...)` into it, one parameter at a time.
    Parameter names must be the unsplit model's (pipeline stages keep them; wrappers applied in
    `parallelize` do not rename). `device`: where the full values are made (default: where the
    parameter lives); random values differ between a CPU and a CUDA generator, so a layout whose
    shards live on the host (FSDP CPU offload) still draws them on the compute device. Returns the
    names filled."""
    done = []
    for part in parts:
        if isinstance(part, DistributedDataParallel):      # its names carry "module."
            part = part.module
        for fqn, p in part.named_parameters():     # a tied parameter once, under its first name
            local = p.to_local() if isinstance(p, DTensor) else p
            full = value(fqn, p.shape, device or local.device, p.dtype)
            if tuple(full.shape) != tuple(p.shape):
                raise ValueError(f"initial value of {fqn}: shape {list(full.shape)}, the parameter's is {list(p.shape)}")
            local.copy_(local_piece(full, p).to(local.device))
            del full
            done.append(fqn)
    return done


def init_local_shards(parts: list[nn.Module], init: ParamInit, storage: torch.device | None = None) -> None:
    """Materialise meta parts on `storage` (default `init.device`) and fill their shards with
    `init.value`, drawn on `init.device`."""
    for part in parts:
        materialize(part, storage or init.device)
    fill_local_shards(parts, init.value, init.device)
