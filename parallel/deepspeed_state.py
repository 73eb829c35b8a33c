"""A DeepSpeed run's training state in OUR checkpoint format: full fp32 weights and AdamW state
under the single-process names (`<fqn>`, `state.<fqn>.exp_avg|exp_avg_sq|step`, as torch's
flattened optimizer state dict names them), so a DeepSpeed run saves DCP checkpoints any layout
resumes, and resumes checkpoints any layout saved (FSDP <-> ZeRO-1/2/3, both ways).

ZeRO keeps each tensor as flat per-rank fragments; DeepSpeed's `safe_get_full_*` /
`safe_set_full_*` (deepspeed.utils) gather and scatter one full tensor at a time. Every rank
holds each gathered tensor in full, which costs one model's worth of host memory per rank while
saving: fine for models a node holds, to be replaced by sharded writes for large ones.
"""
from __future__ import annotations

import torch
from torch import nn

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def inner_optimizer(ds_optimizer):
    """The torch AdamW that ZeRO drives (its state is keyed by the flat fp32 partitions)."""
    return getattr(ds_optimizer, "optimizer", ds_optimizer)


def adam_step(ds_optimizer) -> torch.Tensor:
    """AdamW's step count: the same for every parameter (all are updated every step)."""
    for state in inner_optimizer(ds_optimizer).state.values():
        if "step" in state:
            return torch.as_tensor(state["step"], dtype=torch.float32).detach().clone().cpu()
    return torch.zeros((), dtype=torch.float32)


def ensure_adam_state(ds_optimizer) -> None:
    """A fresh AdamW has no state to load into: create it (zeros, step 0) on every partition,
    as AdamW's first step would; then let ZeRO link its fragments to it."""
    opt = inner_optimizer(ds_optimizer)
    # ZeRO-3 puts its flat partitions into param_groups only during its step: take them from it
    flat = [p for g in opt.param_groups for p in g["params"]] + list(getattr(ds_optimizer, "fp32_partitioned_groups_flat", []))
    for p in {id(p): p for p in flat}.values():
        st = opt.state[p]
        st.setdefault("step", torch.zeros((), dtype=torch.float32))
        for key in ADAM_KEYS:
            if key not in st:
                st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
    relink_adam_state(ds_optimizer)


def relink_adam_state(ds_optimizer) -> None:
    """ZeRO-1/2 (and the bf16 optimizer) map each parameter's view of AdamW's state once, after
    the first optimizer step of the FIRST param group, when the other groups have no state yet
    (deepspeed 0.19.8, `_lazy_init_hp_params_optimizer_state`): with our several groups (decay,
    no decay, muP's hidden) the later groups' views stay empty. Redo the mapping now that every
    group has state."""
    if hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
        ds_optimizer._hp_optimizer_states_linked = False
        ds_optimizer._lazy_init_hp_params_optimizer_state()


class DeepSpeedParts:
    """What trainer/checkpoint.py's CheckpointManager needs from the model and optimizer
    (`state_dict`, `load_state_dict`, `parts`, `optimizers`), for a DeepSpeed engine."""

    def __init__(self, ds_engine, model: nn.Module, deepspeed):
        self.ds, self.model, self.utils, self.deepspeed = ds_engine, model, deepspeed.utils, deepspeed
        self.parts = [model]
        self.optimizers = [ds_engine.optimizer]
        self.params = dict(model.named_parameters(remove_duplicate=False))

    def _full(self, p: nn.Parameter, key: str | None, stepped: bool = True) -> torch.Tensor:
        if key and not stepped:  # no optimizer state yet (never stepped): AdamW's initial zeros
            return torch.zeros(self._shape(p), dtype=torch.float32)
        value = self.utils.safe_get_full_optimizer_state(p, key) if key else self.utils.safe_get_full_fp32_param(p)
        return value.detach().float().reshape(self._shape(p)).cpu().clone()

    @staticmethod
    def _shape(p: nn.Parameter) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_shape") else p.shape    # ZeRO-3 keeps the full shape aside

    def state_dict(self, with_optim: bool = True) -> dict:
        model_sd = {}
        for name, value in self.model.state_dict(keep_vars=True).items():
            model_sd[name] = self._full(self.params[name], None) if name in self.params else value.detach().clone()
        out = {"model": model_sd}
        if with_optim:
            step, optim, seen = adam_step(self.ds.optimizer), {}, set()
            stepped = any(inner_optimizer(self.ds.optimizer).state.values())
            if stepped:
                relink_adam_state(self.ds.optimizer)
            for name, p in self.params.items():
                if id(p) in seen or not p.requires_grad:   # a tied weight is saved once, as torch does
                    continue
                seen.add(id(p))
                for key in ADAM_KEYS:
                    optim[f"state.{name}.{key}"] = self._full(p, key, stepped)
                optim[f"state.{name}.step"] = step.clone()
            out["optim"] = optim
        return out

    def load_state_dict(self, sd: dict) -> None:
        if "optim" in sd:
            ensure_adam_state(self.ds.optimizer)
        params = [p for p in {id(p): p for p in self.params.values()}.values()]
        names = {id(p): n for n, p in self.params.items()}
        # ZeRO-3: the model's own (partitioned) weights are gathered, overwritten on every rank
        # alike and partitioned again on leaving the context; elsewhere the context does nothing.
        with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            with torch.no_grad():
                for p in params:
                    value = sd["model"][names[id(p)]]
                    p.data.copy_(value.reshape(p.shape).to(p.dtype))
        for p in params:
            name = names[id(p)]
            self.utils.safe_set_full_fp32_param(p, sd["model"][name].float().to(self._device(p)))
            if "optim" in sd and p.requires_grad:
                for key in ADAM_KEYS:
                    self.utils.safe_set_full_optimizer_state(p, sd["optim"][f"state.{name}.{key}"].float().to(self._device(p)), key)
        if "optim" in sd:
            step = next((v for k, v in sd["optim"].items() if k.endswith(".step")), None)
            if step is not None:
                for state in inner_optimizer(self.ds.optimizer).state.values():
                    state["step"] = step.detach().clone().to(torch.float32).cpu()
        buffers = {k: v for k, v in sd["model"].items() if k not in self.params}
        if buffers:
            self.model.load_state_dict(buffers, strict=False)

    def fill_weights(self, value) -> None:
        """Weights only (checkpoint.init_from of safetensors): `value(fqn, shape, device, dtype)`
        gives each parameter's full tensor (parallel/sharded_init.py's ValueFn), under its first name."""
        model_sd, first = {}, {}
        for name, p in self.model.named_parameters():
            model_sd[name] = value(name, self._shape(p), torch.device("cpu"), torch.float32)
            first[id(p)] = name
        for name, p in self.params.items():          # a tied weight's other names
            model_sd.setdefault(name, model_sd[first[id(p)]])
        self.load_state_dict({"model": model_sd})

    def save_native(self, folder, tag: str) -> None:
        """DeepSpeed's own checkpoint (`folder/tag/`, `folder/latest`, `folder/zero_to_fp32.py`), as
        `engine.save_checkpoint` writes it, for a DeepSpeed script's `load_checkpoint` (the same
        world size and ZeRO stage) or for zero_to_fp32. A collective: every rank writes its shards."""
        self.ds.save_checkpoint(str(folder), tag=tag)

    @staticmethod
    def _device(p: nn.Parameter) -> torch.device:
        return p.device
