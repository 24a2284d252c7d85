"""Rotary position embeddings (RoPE): the rotation tables, and their rescaling for reading
past the trained context (linear, NTK-aware, YaRN; formulas as in Hugging Face transformers'
rope utils, so exported models agree).

D is the head width; cos / sin tables are in the rotate-half layout Llama uses.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from armodal.model import ModelConfig

__all__ = ["ROPE_SCALINGS", "apply_rope", "rope_at", "rope_inv_freq", "scaled_rope"]

ROPE_SCALINGS = ("linear", "ntk", "yarn")


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def scaled_rope(config: ModelConfig) -> tuple[Tensor, float]:
    """RoPE's inverse frequencies (D/2,) under the config's context-extension scaling, and the
    factor cos and sin are multiplied by (YaRN's attention temperature; 1 otherwise).
    Formulas as in Hugging Face transformers' rope utils, so exported models agree."""
    d, theta, factor = config.head_dim, config.rope_theta, config.rope_factor
    if config.rope_scaling is None or factor == 1.0:
        return rope_inv_freq(d, theta), 1.0
    if config.rope_scaling == "linear":  # positions squeezed into the trained range
        return rope_inv_freq(d, theta) / factor, 1.0
    if config.rope_scaling == "ntk":  # a larger base: high frequencies kept, low ones stretched
        return rope_inv_freq(d, theta * factor ** (d / (d - 2))), 1.0
    # YaRN: dimensions that turn many times within the trained context keep their frequency
    # (extrapolate), those that turn less than once are interpolated, a linear ramp between.
    original = config.rope_original_len or round(config.max_seq_len / factor)

    def dim_at(rotations: float) -> float:  # the dimension that turns `rotations` times
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_at(32)), 0), min(math.ceil(dim_at(1)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3))
    extrapolate = 1 - ramp.clamp(0, 1)  # (D/2,): 1 keeps the frequency, 0 divides by factor
    inv_freq = rope_inv_freq(d, theta)
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_at(positions: Tensor, inv_freq: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin (..., D) for integer positions (...), rotate-half layout as in Llama;
    `scale` multiplies both (YaRN sharpens attention by scale**2 this way)."""
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by position; cos, sin (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)
