"""Turn a sweep spec into the list of runs to execute: each with its trainer overrides, N, D, C,
and, for cooldown branches (Hagele et al. 2024), the base run it branches from.

With cooldown on, each (size, lr, seed) gets ONE base run at constant LR that saves a checkpoint at
step S_i = T_i - K_i for every target T_i (K_i = fraction * T_i cooldown steps); branch i starts
from that checkpoint and decays the LR over K_i steps, giving the point (N, D_i) for K_i steps of
new compute instead of T_i.
"""
from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.model_config import known_tokenizer_ids, padded_vocab

from .model_size import active_numbers, check_model, dense_hidden, model_numbers
from .spec import Spec, SweepSpecError


@dataclass
class Run:
    run_id: str
    kind: str                   # "scratch" (trained from step 0 to D), "base" (constant LR), "branch"
    size: str
    dim: int
    n_params: int
    n_params_non_embedding: int
    D: float                    # tokens of the (N, D) point (a base run: tokens it trains)
    C: float                    # 6 N D of the point (N as chosen by spec.param_count)
    compute_spent: float        # 6 N x tokens this run itself trains (a branch: its cooldown only)
    lr: float
    batch_size: int
    seed: int
    steps_planned: int
    run_dir: str
    overrides: dict
    budget: float | None = None
    parent: str | None = None
    stage: int = 0              # 1 = must wait for stage-0 runs (branches wait for their base)
    config_hash: str = ""
    checkpoint_steps: list = field(default_factory=list)
    parametrization: str = "sp"
    variant: str = ""           # [moe]: "dense" or "moe" (n_params* are then ACTIVE parameters)
    n_params_all: int = 0       # every parameter, all experts included (= n_params for a dense model)

    @property
    def is_branch(self) -> int:
        return int(self.kind == "branch")

    def store_row(self) -> dict:
        d = dict(self.__dict__)
        d["is_branch"] = self.is_branch
        return d


def step_dir_name(step: int) -> str:
    """trainer.checkpoint.step_dir_name, restated so planning does not import torch (seconds);
    a test checks the two agree."""
    return f"step-{step:08d}"


def set_dotted(cfg: dict, key: str, value) -> None:
    *path, last = key.split(".")
    node = cfg
    for p in path:
        node = node.setdefault(p, {})
    node[last] = value


def resolved_config(spec: Spec) -> dict:
    cfg = tomllib.loads(spec.base_config.read_text())
    for k, v in spec.base.items():
        set_dotted(cfg, k, v)
    return cfg


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_sweep(spec: Spec) -> list[Run]:
    cfg = resolved_config(spec)
    seq_len = cfg.get("train", {}).get("seq_len")
    if not isinstance(seq_len, int):
        raise SweepSpecError(f"train.seq_len not found in {spec.base_config} or [base]; it is needed "
                             "to turn tokens into steps")
    base_text = spec.base_config.read_text()
    runs: list[Run] = []
    for size in spec.sizes:
        model = {**cfg.get("model", {}), "dim": size.dim, "n_layers": size.n_layers,
                 "n_heads": size.n_heads, "n_kv_heads": size.n_kv_heads}
        if "vocab_size" not in model:
            raise SweepSpecError(f"model.vocab_size not found in {spec.base_config} or [base]")
        if model["vocab_size"] == 0:     # auto: N is counted before training, so the tokenizer must tell it by name
            ids = known_tokenizer_ids(cfg.get("data", {}).get("tokenizer", "bytes"))
            if ids is None:
                raise SweepSpecError(f"model.vocab_size is 0 (auto) in {spec.base_config}; a sweep counts parameters "
                                     "before training: set 'model.vocab_size' in [base]")
            model["vocab_size"] = padded_vocab(ids)
        for variant in spec.moe_variants or (None,):
            m, moe_ov = _variant_model(spec, size, model, variant)
            n_all = model_numbers(m, seq_len)[0]
            n_tot, n_ne = active_numbers(m)                  # = model_numbers' counts for a dense model
            n = n_tot if spec.param_count == "total" else n_ne
            tps = spec.batch_size[size.dim] * spec.grad_accum * seq_len
            targets = _targets(spec, n)                      # [(budget or None, tokens)]
            for par in spec.parametrizations or (None,):
                for lr in spec.lrs(size):
                    for seed in spec.seeds:
                        ctx = dict(spec=spec, size=size, n=n, n_tot=n_tot, n_ne=n_ne, tps=tps, lr=lr,
                                   seed=seed, base_text=base_text, par=par, variant=variant, moe_ov=moe_ov,
                                   n_all=n_all)
                        runs += _runs_for(ctx, targets)
    ids = [r.run_id for r in runs]
    dup = {i for i in ids if ids.count(i) > 1}
    if dup:
        raise SweepSpecError(f"the design gives several runs the same id {sorted(dup)[:3]}: two "
                             "budgets round to the same step count for a size; spread the budgets")
    return runs


def _variant_model(spec: Spec, size, model: dict, variant: str | None) -> tuple[dict, dict]:
    """(the model.* dict a variant trains, its overrides). "moe": the [moe] keys, with expert width
    expert_width x the size's dense MLP width rounded to a multiple of 8 (the grouped GEMM wants
    16-byte rows); "dense": no experts, whatever the base config says."""
    if variant is None:
        return model, {}
    if variant == "dense":
        return {**model, "moe_experts": 0}, {"model.moe_experts": 0}
    ov = {k: v for k, v in spec.moe.items() if k.startswith("model.")}
    ov["model.moe_hidden"] = max(8, round(spec.moe["expert_width"] * dense_hidden(model) / 8) * 8)
    m = {**model, **{k.removeprefix("model."): v for k, v in ov.items()}}
    try:
        check_model(m)
    except ValueError as e:
        raise SweepSpecError(f"[moe] size {size.name}: {e}") from None
    return m, ov


def _targets(spec: Spec, n: int) -> list:
    if spec.design == "grid":
        return [(None, float(d)) for d in spec.tokens]
    return [(float(c), c / (6.0 * n)) for c in spec.budgets]


def _runs_for(ctx, targets) -> list[Run]:
    spec, tps = ctx["spec"], ctx["tps"]
    out, branch_points = [], []
    for budget, tokens in targets:
        steps = max(1, round(tokens / tps))
        if spec.cooldown:
            k = max(1, round(spec.cooldown_fraction * steps))
            if steps - k <= spec.warmup_steps:
                raise SweepSpecError(
                    f"size {ctx['size'].name}: target of {steps} steps leaves {steps - k} before the "
                    f"cooldown, not more than warmup_steps={spec.warmup_steps}; raise the budget or "
                    "lower warmup")
            branch_points.append((budget, steps, k))
            if spec.compare_from_scratch:
                out.append(_make(ctx, "scratch", steps, budget, decay_steps=k))
        else:
            out.append(_make(ctx, "scratch", steps, budget))
    if branch_points:
        ckpts = sorted({s - k for _, s, k in branch_points})
        base = _make(ctx, "base", ckpts[-1], None, checkpoint_steps=ckpts)
        out.insert(0, base)
        for budget, steps, k in branch_points:
            out.append(_make(ctx, "branch", steps, budget, decay_steps=k, parent=base))
    return out


def _make(ctx, kind, steps, budget, decay_steps=0, parent: Run | None = None, checkpoint_steps=()):
    spec, size, tps = ctx["spec"], ctx["size"], ctx["tps"]
    D = steps * tps
    tag = {"base": "base", "scratch": f"D{D}", "branch": f"D{D}-cd"}[kind]
    par = ctx["par"]
    # under [mup] the parametrization is part of the size's name: sp and muP runs of one width are
    # different models, each with its own best LR (select_points picks one per size)
    variant = ctx["variant"]
    size_name = f"{par}-{size.name}" if par else f"{variant}-{size.name}" if variant else size.name
    run_id = f"{size_name}-lr{ctx['lr']:g}-s{ctx['seed']}-{tag}"
    run_dir = spec.out_dir / "runs" / run_id
    ov = dict(spec.base)
    ov.update(ctx["moe_ov"])
    if par:
        ov.update({"model.parametrization": par, "model.mup_base_dim": spec.mup_base_dim,
                   "model.mup_base_head_dim": size.dim // size.n_heads})
    ov.update({"model.dim": size.dim, "model.n_layers": size.n_layers, "model.n_heads": size.n_heads,
               "model.n_kv_heads": size.n_kv_heads, "train.batch_size": spec.batch_size[size.dim],
               "train.grad_accum": spec.grad_accum, "train.steps": steps, "optim.lr": ctx["lr"],
               "optim.warmup_steps": spec.warmup_steps, "run.seed": ctx["seed"],
               "run.dir": str(run_dir)})
    if kind == "base":        # constant LR after warmup: the stable phase every branch continues
        ov.update({"optim.schedule": "constant", "checkpoint.at_steps": list(checkpoint_steps)})
    elif kind == "branch" or (spec.cooldown and spec.compare_schedule == "wsd"):
        # a branch, or the same WSD schedule trained from step 0 (identical up to the cooldown)
        ov.update({"optim.schedule": "wsd", "optim.decay_steps": decay_steps,
                   "optim.decay_shape": spec.cooldown_shape, "optim.min_lr_ratio": spec.min_lr_ratio})
    elif spec.cooldown:       # the comparison a branch is usually measured against: cosine from step 0
        ov.update({"optim.schedule": "cosine", "optim.min_lr_ratio": spec.min_lr_ratio})
    else:
        ov.update({"optim.schedule": spec.schedule, "optim.min_lr_ratio": spec.min_lr_ratio})
    if parent is not None:
        ov["checkpoint.init_from"] = str(Path(parent.run_dir) / "checkpoints" / step_dir_name(steps - decay_steps))
    new_steps = decay_steps if kind == "branch" else steps
    hashed = {k: v for k, v in ov.items() if k != "run.dir"}
    run = Run(run_id=run_id, kind=kind, size=size_name, dim=size.dim, n_params=ctx["n_tot"],
              n_params_non_embedding=ctx["n_ne"], D=float(D), C=6.0 * ctx["n"] * D,
              compute_spent=6.0 * ctx["n"] * new_steps * tps, lr=ctx["lr"],
              batch_size=spec.batch_size[size.dim], seed=ctx["seed"], steps_planned=steps,
              run_dir=str(run_dir), overrides=ov, budget=budget,
              parent=parent.run_id if parent else None, stage=1 if parent else 0,
              checkpoint_steps=list(checkpoint_steps), parametrization=par or "sp", variant=variant or "",
              n_params_all=ctx["n_all"])
    run.config_hash = _hash([ctx["base_text"], hashed, parent.config_hash if parent else None])
    return run


def override_args(overrides: dict) -> list[str]:
    """--section.key value pairs for the trainer CLI (lists as TOML/JSON arrays, bools lowercase)."""
    args = []
    for k, v in overrides.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, (list, tuple)):
            v = json.dumps(list(v))
        args += [f"--{k}", str(v)]
    return args


def accounting(runs: list[Run]) -> dict:
    """Compute actually spent vs. what the same points would cost trained from scratch."""
    spent = sum(r.compute_spent for r in runs)
    points = [r for r in runs if r.kind in ("branch", "scratch")]
    branches = [r for r in runs if r.kind == "branch"]
    branch_cost = sum(r.compute_spent for r in runs if r.kind in ("base", "branch"))
    from_scratch = sum(r.C for r in branches)
    return {"runs": len(runs), "points": len(points), "branches": len(branches),
            "compute_spent": spent, "branch_compute": branch_cost,
            "branch_points_from_scratch": from_scratch,
            "saved_fraction": 1 - branch_cost / from_scratch if from_scratch else 0.0}
