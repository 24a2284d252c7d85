"""Conditioning on embeddings: an encoder adapter whose outputs enter the transformer as prefix
positions (no tokens, no loss), so a model captions from continuous image features rather
than from discrete codes.

    image ──encoder──▶ (B, h*w, D) features ──Linear + cell embedding──▶ (B, P, C) prefix
    [prefix] <bos> <bot> caption <eot> <eos>   ──Transformer(idx, prefix=...)──▶ caption logits

The encoder is the frozen encoder of the run's VQ codec (`kind: codec`: its continuous
latents, before quantization, the like-for-like peer of captioning from that codec's codes) or a
small trainable CNN (`kind: conv`). Only the projection, the cell embeddings (and a conv
encoder) train beside the transformer.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from armodal.codecs.vqvae import to_unit
from armodal.model import Transformer

__all__ = ["ImagePrefix", "PrefixedModel", "ENCODER_KINDS"]

ENCODER_KINDS = ("codec", "conv")


class ImagePrefix(nn.Module):
    """uint8 images (B, C, H, W) -> (B, P, d_model) prefix embeddings, one per feature cell."""

    def __init__(self, d_model: int, kind: str = "codec", codec: str | None = None,
                 image_size: tuple[int, int] = (28, 28), channels: int = 1) -> None:
        super().__init__()
        if kind not in ENCODER_KINDS:
            raise ValueError(f"prefix encoder kind={kind!r}; allowed: {', '.join(ENCODER_KINDS)}")
        self.kind, self.codec_path = kind, codec
        if kind == "codec":
            if codec is None:
                raise ValueError("prefix encoder kind=codec needs codec=<codec dir>")
            from armodal.codecs.artefact import KIND, load_codec

            codec_model, _ = load_codec(codec, kind=KIND)  # eval mode, frozen
            self.backbone = codec_model.encoder
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        else:  # two stride-2 convs: 28x28 -> 7x7 cells, as the codec's 4x downsampling
            self.backbone = nn.Sequential(
                nn.Conv2d(channels, 32, 4, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(32, 64, 4, stride=2, padding=1), nn.SiLU(),
                nn.Conv2d(64, 64, 3, padding=1))
        with torch.no_grad():
            probe = self.backbone(torch.zeros(1, channels, *image_size))  # (1, D, h, w)
        width, cells = probe.shape[1], probe.shape[2] * probe.shape[3]
        self.n_positions = cells
        self.proj = nn.Linear(width, d_model)
        self.cell = nn.Parameter(torch.zeros(cells, d_model))  # which cell a feature is from
        nn.init.normal_(self.cell, std=0.02)

    def forward(self, images: Tensor) -> Tensor:
        if self.kind == "codec":
            self.backbone.eval()  # frozen: never in training mode
        feats = self.backbone(to_unit(images))  # (B, D, h, w)
        feats = feats.flatten(2).transpose(1, 2)  # (B, h*w, D)
        return self.proj(feats) + self.cell  # (B, P, C)


class PrefixedModel(nn.Module):
    """A Transformer that sees fixed prefix embeddings before every prompt, shaped for
    armodal.generation.generate: the prefix is fed on the first (prefill) forward of a cache,
    or on every forward without one, and the cache has room for it. Prompts must be of equal
    length (no padding) and guidance is not supported."""

    def __init__(self, model: Transformer, prefix: Tensor) -> None:
        super().__init__()
        self.model, self.prefix = model, prefix  # prefix (B, P, C)
        self.n_prefix = prefix.shape[1]
        # Context checks in generate() count tokens; the prefix takes positions too.
        self.config = replace(model.config, max_seq_len=model.config.max_seq_len - self.n_prefix)

    def new_cache(self, batch_size: int, max_len: int | None = None, **kwargs):
        size = (max_len or self.config.max_seq_len) + self.n_prefix
        return self.model.new_cache(batch_size, size, **kwargs)

    def forward(self, idx: Tensor, cache=None, positions: Tensor | None = None) -> Tensor:
        if idx.shape[0] != self.prefix.shape[0]:
            raise ValueError(f"{idx.shape[0]} rows for {self.prefix.shape[0]} prefixes "
                             f"(classifier-free guidance is not supported with a prefix)")
        if positions is not None and bool((positions < 0).any()):
            raise ValueError("prefix models take prompts of equal length (no padding)")
        if cache is None or cache.pos == 0:
            return self.model(idx, cache, prefix=self.prefix)
        return self.model(idx, cache)
