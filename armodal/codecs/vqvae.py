"""VQVAE: a small convolutional VQ-VAE that turns images into a grid of codes and back.

    uint8 (B, C, H, W) -> [-1, 1] -> encoder (stride-2 convs, residual blocks) -> (B, D, h, w)
        -> quantizer over the D-vectors -> codes (B, h, w) -> decoder (transposed convs) -> image

h, w = H / downsample, W / downsample. The quantizer is any module with the VectorQuantizer / FSQ
contract (armodal/codecs/quantizers.py), passed in: the VQ-VAE neither knows nor cares which.
Images whose sides are not multiples of `downsample` are refused rather than padded, so a code
always covers the same downsample x downsample pixel patch and decode(encode(x)) keeps the shape.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn


class VQVAEOutput(NamedTuple):
    recon: Tensor  # (B, C, H, W) float, in the [-1, 1] pixel scale (not clamped)
    codes: Tensor  # (B, h, w) int64
    loss: Tensor  # () the quantizer's loss (commitment / codebook)


class ResBlock(nn.Module):
    """x + conv1x1(act(conv3x3(act(x)))): the VQ-VAE paper's residual block, width kept."""

    def __init__(self, width: int):
        super().__init__()
        self.body = nn.Sequential(nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                  nn.SiLU(), nn.Conv2d(width, width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def to_unit(images: Tensor) -> Tensor:
    """uint8 pixels 0..255 -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """Float pixels in [-1, 1] (clamped) -> uint8 0..255, the inverse of to_unit up to rounding."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class VQVAE(nn.Module):
    """Conv encoder -> quantizer -> conv decoder, for 1- or 3-channel images.

    in_channels: 1 (grey) or 3 (RGB).
    downsample: pixels per code side, a power of two >= 2 (one stride-2 conv per factor 2).
    hidden: the conv width; res_blocks: residual blocks at the code resolution, each side.
    quantizer: VectorQuantizer / FSQ (or alike); its `dim` is the encoder's output width.
    """

    def __init__(self, quantizer: nn.Module, in_channels: int = 3, downsample: int = 4,
                 hidden: int = 64, res_blocks: int = 2):
        super().__init__()
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels={in_channels}; allowed: 1 (grey) or 3 (RGB)")
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample={downsample}; allowed: a power of two >= 2")
        if hidden < 1 or res_blocks < 0:
            raise ValueError(f"hidden={hidden}, res_blocks={res_blocks}; need hidden >= 1 "
                             f"and res_blocks >= 0")
        self.quantizer = quantizer
        self.in_channels, self.downsample = in_channels, downsample
        self.hidden, self.res_blocks = hidden, res_blocks
        self.codebook_size: int = quantizer.codebook_size
        dim, n_down = quantizer.dim, downsample.bit_length() - 1

        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            *[layer for _ in range(n_down)
              for layer in (nn.SiLU(), nn.Conv2d(hidden, hidden, 4, stride=2, padding=1))],
            *[ResBlock(hidden) for _ in range(res_blocks)],
            nn.SiLU(), nn.Conv2d(hidden, dim, 1),
        )
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, hidden, 3, padding=1),
            *[ResBlock(hidden) for _ in range(res_blocks)],
            *[layer for _ in range(n_down)
              for layer in (nn.SiLU(), nn.ConvTranspose2d(hidden, hidden, 4, stride=2,
                                                          padding=1))],
            nn.SiLU(), nn.Conv2d(hidden, in_channels, 3, padding=1),
        )

    def config(self) -> dict:
        """Constructor arguments other than the quantizer (armodal/codecs/artefact.py adds it)."""
        return {"in_channels": self.in_channels, "downsample": self.downsample,
                "hidden": self.hidden, "res_blocks": self.res_blocks}

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The code grid (h, w) of a height x width image; raises unless both divide evenly."""
        if height % self.downsample or width % self.downsample or min(height, width) < 1:
            raise ValueError(f"image size {height}x{width} is not a multiple of downsample="
                             f"{self.downsample}; resize or crop the images (data.images.size=)")
        return height // self.downsample, width // self.downsample

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images (B, {self.in_channels}, H, W), got shape "
                             f"{tuple(x.shape)}")
        self.grid(*x.shape[-2:])

    def encode_latents(self, x: Tensor) -> Tensor:
        """Float images (B, C, H, W) in [-1, 1] -> continuous latents (B, h, w, D)."""
        self._check_input(x)
        return self.encoder(x).permute(0, 2, 3, 1)  # (B, D, h, w) -> (B, h, w, D)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Latents (B, h, w, D) -> float images (B, C, H, W) in the [-1, 1] scale."""
        return self.decoder(z.permute(0, 3, 1, 2))

    def forward(self, x: Tensor) -> VQVAEOutput:
        """Float images (B, C, H, W) in [-1, 1] -> reconstruction, codes and quantizer loss."""
        quantized, codes, loss = self.quantizer(self.encode_latents(x))  # (B, h, w, D)
        return VQVAEOutput(self.decode_latents(quantized), codes, loss)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """uint8 images (B, C, H, W) or one (C, H, W) -> int64 codes (B, h, w) or (h, w).

        Never updates the codebook, whatever the training mode."""
        if images.dtype != torch.uint8:
            raise ValueError(f"encode takes uint8 images (0..255), got {images.dtype}")
        single = images.dim() == 3
        batch = images[None] if single else images
        codes = self.quantizer.encode(self.encode_latents(to_unit(batch)))  # (B, h, w)
        return codes[0] if single else codes

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """int64 codes (B, h, w) or (h, w) -> uint8 images (B, C, H, W) or (C, H, W)."""
        if codes.dim() not in (2, 3):
            raise ValueError(f"decode takes codes (B, h, w) or (h, w), got shape "
                             f"{tuple(codes.shape)}")
        single = codes.dim() == 2
        batch = codes[None] if single else codes
        images = to_uint8(self.decode_latents(self.quantizer.decode(batch)))  # (B, C, H, W)
        return images[0] if single else images
