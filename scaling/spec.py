"""Sweep spec: a TOML file naming the base run config, the model-size family, the design (an (N, D)
grid or IsoFLOP budgets), LR and batch rules, seeds and the cooldown-branch option. Parsed into
frozen dataclasses; every bad field raises SweepSpecError naming it. See scaling/README.md."""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import SweepSpecError


@dataclass(frozen=True)
class Size:
    name: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int


@dataclass(frozen=True)
class Spec:
    path: Path
    name: str
    out_dir: Path
    base_config: Path
    trainer: tuple
    seeds: tuple
    param_count: str                 # "total" | "non_embedding": which N the design and fits use
    base: dict                       # dotted overrides every run inherits
    sizes: tuple
    design: str                      # "isoflop" | "grid"
    budgets: tuple = ()
    tokens: tuple = ()
    batch_size: dict = field(default_factory=dict)   # dim -> sequences per step
    grad_accum: int = 1
    lr_rule: str = "fixed"
    lr_base: float = 1e-3
    lr_ref_dim: int = 0
    lr_exponent: float = -1.0
    lr_grid: tuple = (1.0,)
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    cooldown: bool = False
    cooldown_fraction: float = 0.2
    cooldown_shape: str = "1-sqrt"
    compare_from_scratch: bool = False
    compare_schedule: str = "wsd"    # schedule of those scratch runs: "wsd" (same as the branch) or "cosine"
    # [mup]: train every (size, lr) under each parametrization, muP ones with model.mup_base_dim =
    # mup_base_dim and mup_base_head_dim = the family's head_dim (widening adds heads); () = no [mup]
    parametrizations: tuple = ()
    mup_base_dim: int = 0
    # [moe]: train every size as each variant ("dense", "moe"); MoE runs get these model.moe_* keys
    # and moe_hidden = expert_width x the size's dense MLP width; N = active parameters; () = no [moe]
    moe_variants: tuple = ()
    moe: dict = field(default_factory=dict)
    # [slurm]: `profile` (a cluster profile name or path) and single profile keys for `run --slurm`;
    # checked where the profile is loaded (launch/slurm_profile.py), which scaling/ may not import
    slurm: dict = field(default_factory=dict)

    def lrs(self, size: Size) -> list[float]:
        base = self.lr_base
        if self.lr_rule == "scaled":
            base = self.lr_base * (size.dim / self.lr_ref_dim) ** self.lr_exponent
        return [float(f"{base * m:.4g}") for m in self.lr_grid]

    @property
    def results_path(self) -> Path:
        return self.out_dir / "results.sqlite"


def _take(table: dict, where: str, key: str, kind, default=..., choices=None):
    if key not in table:
        if default is ...:
            raise SweepSpecError(f"[{where}] needs `{key}`")
        return default
    v = table.pop(key)
    ok = isinstance(v, kind) and not (kind in (int, float, (int, float)) and isinstance(v, bool))
    if not ok:
        raise SweepSpecError(f"[{where}] {key} = {v!r}: expected {getattr(kind, '__name__', kind)}")
    if choices and v not in choices:
        raise SweepSpecError(f"[{where}] {key} = {v!r}: expected one of {list(choices)}")
    return v


def _positive_list(v, where, key, kind=(int, float)):
    if not isinstance(v, list) or not v or not all(isinstance(x, kind) and x > 0 for x in v):
        raise SweepSpecError(f"[{where}] {key} must be a non-empty list of positive numbers, got {v!r}")
    return tuple(v)


def _no_leftovers(table, where):
    if table:
        raise SweepSpecError(f"[{where}] has unknown keys {sorted(table)}")


def _sizes(fam: dict) -> tuple:
    dims = _positive_list(_take(fam, "family", "dims", list), "family", "dims", int)
    layers = _take(fam, "family", "n_layers", int, None)
    aspect = _take(fam, "family", "aspect_ratio", (int, float), None)
    if (layers is None) == (aspect is None):
        raise SweepSpecError("[family] give exactly one of n_layers (fixed depth) or aspect_ratio "
                             "(n_layers = round(dim / aspect_ratio))")
    head_dim = _take(fam, "family", "head_dim", int)
    kv_ratio = _take(fam, "family", "kv_ratio", int, 1)
    _no_leftovers(fam, "family")
    sizes = []
    for d in dims:
        if d % head_dim:
            raise SweepSpecError(f"[family] dim {d} is not a multiple of head_dim {head_dim}")
        heads = d // head_dim
        if heads % kv_ratio:
            raise SweepSpecError(f"[family] {heads} heads (dim {d}) not divisible by kv_ratio {kv_ratio}")
        nl = layers if layers is not None else max(1, round(d / aspect))
        sizes.append(Size(f"d{d}l{nl}", d, nl, heads, heads // kv_ratio))
    return tuple(sizes)


def _mup(mup: dict, kw: dict) -> None:
    """[mup] base_dim (required) and parametrizations (default ["sp", "mup"]): an LR-transfer sweep."""
    kw["mup_base_dim"] = _take(mup, "mup", "base_dim", int)
    if kw["mup_base_dim"] < 1:
        raise SweepSpecError(f"[mup] base_dim = {kw['mup_base_dim']}: must be a positive width (e.g. the smallest dim)")
    pars = _take(mup, "mup", "parametrizations", list, ["sp", "mup"])
    if not pars or any(p not in ("sp", "mup") for p in pars) or len(set(pars)) != len(pars):
        raise SweepSpecError(f"[mup] parametrizations = {pars!r}: expected a list of distinct 'sp' / 'mup'")
    kw["parametrizations"] = tuple(pars)
    _no_leftovers(mup, "mup")


def _moe(moe: dict, kw: dict) -> None:
    """[moe]: experts (required), top_k (2), shared_experts (0), every (1), expert_width (1 / top_k:
    top_k experts then use the dense MLP's matmul FLOPs) and variants (default ["dense", "moe"])."""
    experts = _take(moe, "moe", "experts", int)
    top_k = _take(moe, "moe", "top_k", int, 2)
    if experts < 2 or not 1 <= top_k <= experts:
        raise SweepSpecError(f"[moe] experts = {experts}, top_k = {top_k}: need experts >= 2 and 1 <= top_k <= experts")
    shared = _take(moe, "moe", "shared_experts", int, 0)
    every = _take(moe, "moe", "every", int, 1)
    width = float(_take(moe, "moe", "expert_width", (int, float), 1.0 / top_k))
    if shared < 0 or every < 1 or width <= 0:
        raise SweepSpecError(f"[moe] shared_experts = {shared}, every = {every}, expert_width = {width}: need "
                             "shared_experts >= 0, every >= 1, expert_width > 0 (a fraction of the dense MLP width)")
    variants = _take(moe, "moe", "variants", list, ["dense", "moe"])
    if not variants or any(v not in ("dense", "moe") for v in variants) or len(set(variants)) != len(variants):
        raise SweepSpecError(f"[moe] variants = {variants!r}: expected a list of distinct 'dense' / 'moe'")
    _no_leftovers(moe, "moe")
    kw["moe_variants"] = tuple(variants)
    kw["moe"] = {"model.moe_experts": experts, "model.moe_top_k": top_k, "model.moe_shared_experts": shared,
                 "model.moe_every": every, "expert_width": width}


def load_spec(path: str | Path) -> Spec:
    """Paths inside the spec (out_dir, base_config) are relative to the directory you run from."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SweepSpecError(f"sweep spec {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise SweepSpecError(f"sweep spec {path} is not valid TOML: {e}") from None
    known = {"sweep", "base", "family", "design", "batch", "lr", "cooldown", "mup", "moe", "slurm"}
    if set(raw) - known:
        raise SweepSpecError(f"{path}: unknown tables {sorted(set(raw) - known)}; known: {sorted(known)}")
    sw, des, bat = dict(raw.get("sweep", {})), dict(raw.get("design", {})), dict(raw.get("batch", {}))
    lr, cd = dict(raw.get("lr", {})), dict(raw.get("cooldown", {}))
    kw = dict(path=path, name=_take(sw, "sweep", "name", str),
              out_dir=Path(_take(sw, "sweep", "out_dir", str)),
              base_config=Path(_take(sw, "sweep", "base_config", str)),
              trainer=tuple(_take(sw, "sweep", "trainer", list, ["python", "-m", "trainer", "train"])),
              seeds=tuple(_take(sw, "sweep", "seeds", list, [0])),
              param_count=_take(sw, "sweep", "param_count", str, "total", ("total", "non_embedding")),
              base=dict(raw.get("base", {})), sizes=_sizes(dict(raw.get("family", {}))),
              slurm=dict(raw.get("slurm", {})))
    _no_leftovers(sw, "sweep")
    kw["design"] = _take(des, "design", "kind", str, choices=("isoflop", "grid"))
    if kw["design"] == "isoflop":
        kw["budgets"] = _positive_list(_take(des, "design", "budgets", list), "design", "budgets")
    else:
        kw["tokens"] = _positive_list(_take(des, "design", "tokens", list), "design", "tokens")
    _no_leftovers(des, "design")

    bs = _take(bat, "batch", "batch_size", (int, dict))
    dims = [s.dim for s in kw["sizes"]]
    if isinstance(bs, int):
        kw["batch_size"] = dict.fromkeys(dims, bs)
    else:
        missing = [d for d in dims if str(d) not in bs]
        if missing:
            raise SweepSpecError(f"[batch] batch_size table lacks dims {missing} (keys are dims as strings)")
        kw["batch_size"] = {d: int(bs[str(d)]) for d in dims}
    kw["grad_accum"] = _take(bat, "batch", "grad_accum", int, 1)
    _no_leftovers(bat, "batch")

    kw["lr_rule"] = _take(lr, "lr", "rule", str, "fixed", ("fixed", "scaled"))
    kw["lr_base"] = float(_take(lr, "lr", "base", (int, float)))
    if kw["lr_rule"] == "scaled":
        kw["lr_ref_dim"] = _take(lr, "lr", "ref_dim", int)
        kw["lr_exponent"] = float(_take(lr, "lr", "exponent", (int, float), -1.0))
    kw["lr_grid"] = _positive_list(_take(lr, "lr", "grid", list, [1.0]), "lr", "grid")
    kw["warmup_steps"] = _take(lr, "lr", "warmup_steps", int, 0)
    kw["schedule"] = _take(lr, "lr", "schedule", str, "cosine", ("cosine", "wsd", "constant"))
    kw["min_lr_ratio"] = float(_take(lr, "lr", "min_lr_ratio", (int, float), 0.1))
    _no_leftovers(lr, "lr")

    kw["cooldown"] = _take(cd, "cooldown", "enabled", bool, False)
    kw["cooldown_fraction"] = float(_take(cd, "cooldown", "fraction", (int, float), 0.2))
    if not 0 < kw["cooldown_fraction"] < 1:
        raise SweepSpecError(f"[cooldown] fraction = {kw['cooldown_fraction']}: must be in (0, 1)")
    kw["cooldown_shape"] = _take(cd, "cooldown", "shape", str, "1-sqrt", ("linear", "1-sqrt"))
    kw["compare_from_scratch"] = _take(cd, "cooldown", "compare_from_scratch", bool, False)
    kw["compare_schedule"] = _take(cd, "cooldown", "compare_schedule", str, "wsd", ("wsd", "cosine"))
    _no_leftovers(cd, "cooldown")
    if "mup" in raw:
        _mup(dict(raw["mup"]), kw)
    if "moe" in raw:
        if "mup" in raw:     # the trainer refuses muP with experts; the two comparisons do not mix
            raise SweepSpecError("[moe] and [mup]: one comparison per sweep (muP with experts is not supported)")
        _moe(dict(raw["moe"]), kw)
    if not kw["base_config"].exists():
        raise SweepSpecError(f"[sweep] base_config {kw['base_config']} does not exist "
                             "(paths are relative to the directory you run from)")
    return Spec(**kw)
