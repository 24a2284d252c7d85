"""Finite scalar quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE Made
Simple"): each of a few dimensions is bounded and rounded to one of `levels[i]` values.

The implicit codebook is the grid of all level combinations, prod(levels) codes, and every grid
point is reachable by construction, so there is no codebook to collapse, no auxiliary loss, no
EMA and no restarts. Same contract as VectorQuantizer (see armodal/codecs/quantizers.py).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from armodal.codecs.quantizers import QuantizerOutput, check_codes


class FSQ(nn.Module):
    """Project (..., dim) to len(levels) dims, bound each with tanh, round (straight-through).

    levels: values per dimension, each >= 2, e.g. [8, 5, 5, 5] (1000 codes) or [8, 8, 8] (512).
    dim: the input width; None means len(levels) (no projection).
    A code is the mixed-radix number whose digit i (0 .. levels[i]-1) is dimension i's level.
    """

    def __init__(self, levels: list[int], dim: int | None = None, eps: float = 1e-3):
        super().__init__()
        levels = [int(level) for level in levels]
        if not levels or min(levels) < 2:
            raise ValueError(f"levels={levels}; FSQ needs at least one dimension, each with "
                             f">= 2 levels, e.g. [8, 5, 5, 5]")
        self.levels, self.eps = levels, eps
        self.dim = dim or len(levels)
        self.codebook_size = math.prod(levels)
        project = self.dim != len(levels)
        self.project_in = nn.Linear(self.dim, len(levels)) if project else nn.Identity()
        self.project_out = nn.Linear(len(levels), self.dim) if project else nn.Identity()
        # Fixed by `levels`, so not saved: a checkpoint never disagrees with its config.
        self.register_buffer("_levels", torch.tensor(levels), persistent=False)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]]), 0)
        self.register_buffer("_basis", basis, persistent=False)  # (d,) mixed-radix weights

    def config(self) -> dict:
        """Constructor keyword arguments: enough to rebuild this quantizer's architecture."""
        return {"levels": list(self.levels), "dim": self.dim, "eps": self.eps}

    def _half_width(self) -> Tensor:
        return (self._levels // 2).float()  # (d,)

    def _bound(self, z: Tensor) -> Tensor:
        """Squash z (N, d) into ((L-1)/2)-wide intervals that round to exactly L integers."""
        half = (self._levels - 1).float() * (1 - self.eps) / 2  # (d,)
        # Even L: the interval is shifted by half a step, so it holds L integers, not L+1.
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)  # (d,)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def _quantize(self, x: Tensor) -> Tensor:
        """(..., dim) -> (N, d) grid values in [-1, 1], straight-through through the rounding."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"input has last dimension {x.shape[-1]}; this quantizer takes "
                             f"(..., {self.dim}) vectors")
        z = self._bound(self.project_in(x.float().reshape(-1, self.dim)))  # (N, d)
        z = z + (z.round() - z).detach()
        return z / self._half_width()

    def _codes(self, zhat: Tensor) -> Tensor:
        digits = (zhat * self._half_width() + self._half_width()).round().long()  # (N, d)
        return (digits * self._basis).sum(-1)  # (N,)

    def encode(self, x: Tensor) -> Tensor:
        """(..., dim) -> (...) int64 codes in [0, prod(levels))."""
        with torch.autocast(x.device.type, enabled=False):
            return self._codes(self._quantize(x)).reshape(x.shape[:-1])

    def grid_values(self, codes: Tensor) -> Tensor:
        """(...) codes -> (..., d) grid values in [-1, 1], before the up-projection."""
        check_codes(codes, self.codebook_size)
        digits = (codes[..., None] // self._basis) % self._levels  # (..., d)
        return (digits.float() - self._half_width()) / self._half_width()

    def decode(self, codes: Tensor) -> Tensor:
        """(...) int64 codes -> (..., dim) vectors."""
        with torch.autocast(codes.device.type, enabled=False):
            return self.project_out(self.grid_values(codes))

    def forward(self, x: Tensor) -> QuantizerOutput:
        with torch.autocast(x.device.type, enabled=False):
            zhat = self._quantize(x)  # (N, d)
            quantized = self.project_out(zhat)  # (N, dim)
            codes = self._codes(zhat.detach())
        return QuantizerOutput(quantized.reshape(x.shape).to(x.dtype),
                               codes.reshape(x.shape[:-1]), x.new_zeros((), dtype=torch.float32))
