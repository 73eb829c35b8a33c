"""RoPE frequencies, plain or scaled for context extension (Llama 3.1's and YaRN's rules).

A model trained at `model.rope_original_max_len` positions continues at a longer
`model.max_seq_len` with its rotary frequencies stretched by `model.rope_factor`:
- llama3: wavelengths longer than original_len / low_freq_factor are divided by the factor
  (interpolated), shorter than original_len / high_freq_factor kept, a smooth blend between;
- yarn (Peng et al. 2023): the same idea with the blend over dimensions whose rotation count
  over the original length lies between beta_slow and beta_fast, plus an attention factor
  (0.1 ln(factor) + 1 unless set) that multiplies cos and sin, i.e. the q.k logits by its square.
The maths are transformers' (`modeling_rope_utils.ROPE_INIT_FUNCTIONS`, 'llama3' and 'yarn',
truncate = True) so an exported model's `rope_parameters` reproduce our logits.
"""
from __future__ import annotations

import math

import torch

from core.model_config import ModelConfig


def base_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))


def _llama3(inv: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    old = c.rope_original_max_len
    low_wavelen, high_wavelen = old / c.rope_low_freq_factor, old / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = (old / wavelen - c.rope_low_freq_factor) / (c.rope_high_freq_factor - c.rope_low_freq_factor)
    smoothed = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv: torch.Tensor, c: ModelConfig) -> torch.Tensor:
    dim, base = c.head_dim, c.rope_theta

    def correction_dim(rotations: float) -> float:
        """The dimension whose frequency turns `rotations` times over the original length."""
        return dim * math.log(c.rope_original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(c.rope_beta_fast)), 0)
    high = min(math.ceil(correction_dim(c.rope_beta_slow)), dim - 1)
    if low == high:
        high += 0.001       # transformers' guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device=inv.device) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp       # 1: keep the trained frequency, 0: divide it by the factor
    return inv / c.rope_factor * (1 - extrapolate) + inv * extrapolate


def attention_factor(c: ModelConfig) -> float:
    """YaRN's cos/sin multiplier (1 for the others)."""
    if c.rope_scaling != "yarn":
        return 1.0
    if c.rope_attention_factor:
        return c.rope_attention_factor
    return 0.1 * math.log(c.rope_factor) + 1.0 if c.rope_factor > 1 else 1.0


def rope_inv_freq(c: ModelConfig, device=None) -> torch.Tensor:
    inv = base_inv_freq(c.head_dim, c.rope_theta, device)
    if c.rope_scaling == "llama3":
        return _llama3(inv, c)
    if c.rope_scaling == "yarn":
        return _yarn(inv, c)
    return inv


def rope_cache(c: ModelConfig, device=None) -> torch.Tensor:
    """[max_seq_len, head_dim/2, 2] of (cos, sin) for rotary embeddings, scaled as configured."""
    angles = torch.outer(torch.arange(c.max_seq_len, device=device, dtype=torch.float32), rope_inv_freq(c, device))
    return torch.stack([angles.cos(), angles.sin()], dim=-1) * attention_factor(c)


def hf_rope_parameters(c: ModelConfig) -> dict:
    """transformers 5's `rope_parameters` for this config (the same keys in 4.x's rope_scaling)."""
    params: dict = {"rope_type": "default", "rope_theta": c.rope_theta}
    if c.rope_scaling == "llama3":
        params.update(rope_type="llama3", factor=c.rope_factor, original_max_position_embeddings=c.rope_original_max_len,
                      low_freq_factor=c.rope_low_freq_factor, high_freq_factor=c.rope_high_freq_factor)
    elif c.rope_scaling == "yarn":
        params.update(rope_type="yarn", factor=c.rope_factor, original_max_position_embeddings=c.rope_original_max_len,
                      beta_fast=c.rope_beta_fast, beta_slow=c.rope_beta_slow, attention_factor=attention_factor(c),
                      truncate=True)
    return params
