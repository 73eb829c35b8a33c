"""Numeric precision of training: the `[precision]` config section.

Which library is installed and whether there is a GPU are checked when the model is converted
(parallel/precision.py), not here: a GPU config must still load on a CPU machine (planner, sweeps).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.config_parse import option

FP8_RECIPES = {"torchao": ("tensorwise", "rowwise"), "te": ("delayed", "current", "mxfp8")}
DEFAULT_RECIPE = {"torchao": "tensorwise", "te": "delayed"}




@dataclass
class PrecisionConfig:
    dtype: Literal["fp32", "bf16", "fp8"] = option(
        "compute precision; fp32 is the CPU default; fp8 = fp8 matmuls in the linear layers, bf16 elsewhere", "fp32")
    bf16_mode: Literal["autocast", "params"] = option(
        "bf16 (and the non-fp8 part of fp8) by autocast over fp32 weights, or bf16 parameters with fp32 master "
        "weights and fp32 gradient reduction (FSDP mixed precision; without FSDP this falls back to autocast)",
        "autocast")
    fp8_backend: Literal["torchao", "te"] = option(
        "fp8 library: torchao float8 training (CPU and GPU) or NVIDIA transformer-engine (CUDA only)", "torchao")
    fp8_recipe: Literal["auto", "tensorwise", "rowwise", "delayed", "current", "mxfp8"] = option(
        "fp8 scaling recipe: torchao tensorwise|rowwise, te delayed|current|mxfp8 (mxfp8 needs Blackwell); "
        "auto = tensorwise for torchao, delayed for te", "auto")
    fp8_exclude: list[str] = option(
        "linear layers kept in high precision, by name or dotted name part (e.g. output, attention.wo, layers.0)",
        factory=lambda: ["output", "tok_embeddings"])
    fp8_min_dim: int = option(
        "keep linear layers with in or out features below this in high precision (small matmuls gain nothing from "
        "fp8; ~1024 on H100); layers whose dims are not multiples of 16 always stay in high precision", 0)
    fp8_fsdp_all_gather: bool = option(
        "torchao: all-gather FSDP parameters in fp8 (tensorwise recipe only); scales are precomputed after each "
        "optimizer step", False)
    fp8_amax_history: int = option("te delayed scaling: length of the amax history", 1024)

    @property
    def recipe(self) -> str:
        """The fp8 recipe with `auto` resolved for the backend."""
        return DEFAULT_RECIPE[self.fp8_backend] if self.fp8_recipe == "auto" else self.fp8_recipe

    def validate(self) -> None:
        allowed = FP8_RECIPES[self.fp8_backend]
        if self.recipe not in allowed:
            other = next(b for b, r in FP8_RECIPES.items() if self.recipe in r)
            raise ValueError(f"precision.fp8_recipe: {self.recipe!r} is a recipe of fp8_backend={other!r}; "
                             f"fp8_backend={self.fp8_backend!r} takes one of {', '.join(allowed)} (or auto)")
        if self.fp8_fsdp_all_gather and (self.fp8_backend != "torchao" or self.recipe != "tensorwise"):
            raise ValueError("precision.fp8_fsdp_all_gather: only the torchao tensorwise recipe can all-gather in fp8; "
                             f"got fp8_backend={self.fp8_backend!r}, fp8_recipe={self.recipe!r}")
        if self.fp8_min_dim < 0:
            raise ValueError(f"precision.fp8_min_dim: must be >= 0, got {self.fp8_min_dim}")
        if self.fp8_amax_history < 1:
            raise ValueError(f"precision.fp8_amax_history: must be >= 1, got {self.fp8_amax_history}")
        for name in self.fp8_exclude:
            if not name or name.startswith(".") or name.endswith("."):
                raise ValueError(f"precision.fp8_exclude: {name!r} is not a module name such as 'output' or 'attention.wo'")
