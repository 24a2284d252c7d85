"""AudioCodec: a small causal convolutional codec, waveform -> residual VQ codes -> waveform.

    wave (B, 1, S) at sample_rate
      -> encoder: causal conv, then per stride s: a causal conv of stride s that doubles the
         width, and residual units (dilated causal convs)        -> latents (B, D, T)
      -> ResidualVQ over the D-vectors of each frame              -> codes (B, K, T)
      -> decoder, the mirror image: per stride residual units, then a causal transposed conv
         of stride s that halves the width                        -> wave (B, 1, T * hop)

hop = prod(strides) samples per frame, T = ceil(S / hop), frame_rate = sample_rate / hop.

Every conv is causal (padding on the left only; transposed convs trimmed on the right), so the
codes of frame t depend only on samples < (t + 1) * hop and the decoder's samples of frame t
only on codes <= t: the codec can stream, and an LM over its codes never sees the future.

A wave whose length S is not a multiple of hop is padded with zeros on the right up to T * hop;
forward() trims its reconstruction back to S, decode() cannot know S and returns T * hop samples.
By causality the padding only touches the last frame's codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from armodal.codecs.rvq import ResidualVQ

ACTIVATIONS = ("leaky_relu", "elu", "silu")


def activation_layer(name: str) -> nn.Module:
    """A fresh activation module by name (one of ACTIVATIONS).

    elu is SoundStream's and EnCodec's, but ~20x slower than the others on CPU in torch 2.x;
    leaky_relu (slope 0.1, HiFi-GAN's) keeps its unit slope for positive inputs, so a deep stack
    passes the small waveform through at initialisation, where silu halves it at every layer."""
    if name == "leaky_relu":
        return nn.LeakyReLU(0.1)
    if name == "elu":
        return nn.ELU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"activation={name!r}; allowed: {', '.join(ACTIVATIONS)}")


class AudioCodecOutput(NamedTuple):
    recon: Tensor  # (B, 1, S) float waveform, not clamped
    codes: Tensor  # (B, K, T) int64; DROPPED (-1) for levels skipped under quantizer dropout
    loss: Tensor  # () the residual VQ's commitment loss


class CausalConv1d(nn.Conv1d):
    """Conv1d padded on the left only: output t sees inputs <= t * stride + stride - 1."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N) -> (B, C', N / stride)
        (k,), (d,), (s,) = self.kernel_size, self.dilation, self.stride
        return super().forward(F.pad(x, (d * (k - 1) + 1 - s, 0)))


class CausalConvTranspose1d(nn.ConvTranspose1d):
    """ConvTranspose1d trimmed on the right to exactly stride * N outputs, so output sample n
    depends on inputs <= n // stride only."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, N) -> (B, C', N * stride)
        return super().forward(x)[..., :x.shape[-1] * self.stride[0]]


class ResidualUnit(nn.Module):
    """x + conv1x1(act(dilated causal conv(act(x)))), width kept (SoundStream's unit)."""

    def __init__(self, width: int, dilation: int, kernel_size: int, activation: str):
        super().__init__()
        self.body = nn.Sequential(activation_layer(activation),
                                  CausalConv1d(width, width, kernel_size, dilation=dilation),
                                  activation_layer(activation), nn.Conv1d(width, width, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class AudioCodec(nn.Module):
    """Causal conv encoder -> ResidualVQ -> causal conv decoder, for mono waveforms.

    quantizer: the ResidualVQ; its `dim` is the latent width D.
    sample_rate: of the waveforms, recorded so the codec's frame rate and bitrate mean something.
    strides: downsampling factor of each encoder stage; hop = their product.
    channels: width of the first stage; each stride doubles it (the decoder halves it back).
    dilations: one residual unit per dilation, in every stage of encoder and decoder.
    kernel_size: of the residual units' and the input / output convs.
    activation: "leaky_relu" (slope 0.1), "elu" (SoundStream, EnCodec) or "silu".
    """

    def __init__(self, quantizer: ResidualVQ, sample_rate: int = 16000,
                 strides: tuple[int, ...] = (4, 5, 8), channels: int = 16,
                 dilations: tuple[int, ...] = (1, 3, 9), kernel_size: int = 7,
                 activation: str = "leaky_relu"):
        super().__init__()
        strides, dilations = tuple(strides), tuple(dilations)
        if not strides or min(strides) < 1:
            raise ValueError(f"strides={list(strides)}; need at least one stride, all >= 1")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if sample_rate < 1 or channels < 1 or kernel_size < 1 or min(dilations, default=1) < 1:
            raise ValueError(f"sample_rate={sample_rate}, channels={channels}, kernel_size="
                             f"{kernel_size}, dilations={list(dilations)}; all must be >= 1")
        self.quantizer = quantizer
        self.sample_rate, self.strides, self.channels = sample_rate, strides, channels
        self.dilations, self.kernel_size, self.activation = dilations, kernel_size, activation
        self.hop = math.prod(strides)
        self.n_levels: int = quantizer.n_levels
        self.codebook_size: int = quantizer.codebook_size
        widths = [channels * 2 ** i for i in range(len(strides) + 1)]  # per stage, in and out

        def units(width: int) -> list[nn.Module]:
            return [ResidualUnit(width, d, kernel_size, activation) for d in dilations]

        def act() -> nn.Module:
            return activation_layer(activation)

        # Residual units run after each downsampling (before each upsampling), never at the
        # full sample rate: there they would cost stride-fold more for little gain.
        encoder: list[nn.Module] = [CausalConv1d(1, channels, kernel_size)]
        for s, w_in, w_out in zip(strides, widths, widths[1:]):
            # Kernel 2s: each frame sees its own s samples and the previous s.
            encoder += [act(), CausalConv1d(w_in, w_out, 2 * s, stride=s), *units(w_out)]
        encoder += [act(), CausalConv1d(widths[-1], quantizer.dim, 3)]
        self.encoder = nn.Sequential(*encoder)

        decoder: list[nn.Module] = [CausalConv1d(quantizer.dim, widths[-1], kernel_size)]
        for s, w_in, w_out in reversed(list(zip(strides, widths, widths[1:]))):
            decoder += [*units(w_out), act(), CausalConvTranspose1d(w_out, w_in, 2 * s, stride=s)]
        decoder += [act(), CausalConv1d(channels, 1, kernel_size)]
        self.decoder = nn.Sequential(*decoder)
        self._init_weights()

    def _init_weights(self) -> None:
        # PyTorch's default conv init shrinks the signal ~3x per layer: after a dozen layers a
        # waveform (std ~0.1) reaches the output as ~0, and the codec first learns to output
        # silence and stays there. He-normal weights keep the scale layer to layer, and every
        # residual unit starts as the identity (its last conv at zero).
        gain = nn.init.calculate_gain("leaky_relu", 0.1)
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose1d):  # weight (in, out, k), k / stride taps
                fan_in = module.weight.shape[0] * module.weight.shape[-1] // module.stride[0]
            elif isinstance(module, nn.Conv1d):  # weight (out, in, k)
                fan_in = module.weight.shape[1] * module.weight.shape[-1]
            else:
                continue
            nn.init.normal_(module.weight, std=gain / math.sqrt(fan_in))
            nn.init.zeros_(module.bias)
        for module in self.modules():
            if isinstance(module, ResidualUnit):
                nn.init.zeros_(module.body[-1].weight)

    def config(self) -> dict:
        """Constructor arguments other than the quantizer (armodal/codecs/artefact.py adds it)."""
        return {"sample_rate": self.sample_rate, "strides": list(self.strides),
                "channels": self.channels, "dilations": list(self.dilations),
                "kernel_size": self.kernel_size, "activation": self.activation}

    @property
    def frame_rate(self) -> float:
        """Code frames per second of audio: sample_rate / hop."""
        return self.sample_rate / self.hop

    def bitrate(self, n_q: int | None = None) -> float:
        """Bits per second of the codes of the first n_q levels (default all K), at a uniform
        code distribution: frame_rate * n_q * log2(codebook_size)."""
        n_q = self.n_levels if n_q is None else n_q
        if not 1 <= n_q <= self.n_levels:
            raise ValueError(f"n_q={n_q}; this codec has levels 1..{self.n_levels}")
        return self.frame_rate * n_q * math.log2(self.codebook_size)

    def frames(self, n_samples: int) -> int:
        """Code frames of a wave of n_samples: ceil(n_samples / hop)."""
        return -(-n_samples // self.hop)

    def encode_latents(self, wave: Tensor) -> Tensor:
        """wave (B, 1, S) -> latents (B, T, D), the wave zero-padded on the right to T * hop."""
        if wave.dim() != 3 or wave.shape[1] != 1 or wave.shape[-1] < 1:
            raise ValueError(f"expected mono waves (B, 1, S) with S >= 1, got shape "
                             f"{tuple(wave.shape)}")
        pad = self.frames(wave.shape[-1]) * self.hop - wave.shape[-1]
        return self.encoder(F.pad(wave.float(), (0, pad))).transpose(1, 2)  # (B, T, D)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Latents (B, T, D) -> wave (B, 1, T * hop)."""
        return self.decoder(z.transpose(1, 2))

    def forward(self, wave: Tensor) -> AudioCodecOutput:
        """wave (B, 1, S) -> reconstruction (B, 1, S), codes (B, K, T) and the VQ loss."""
        quantized, codes, loss = self.quantizer(self.encode_latents(wave))  # (B, T, D)
        return AudioCodecOutput(self.decode_latents(quantized)[..., :wave.shape[-1]], codes, loss)

    @torch.no_grad()
    def encode(self, wave: Tensor, n_q: int | None = None) -> Tensor:
        """wave (B, 1, S) -> int64 codes (B, n_q, T) of the first n_q levels (default all K).

        Never updates the codebooks, whatever the training mode."""
        return self.quantizer.encode(self.encode_latents(wave), n_q)

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        """int64 codes (B, K', T) of the first K' levels -> wave (B, 1, T * hop), not clamped."""
        return self.decode_latents(self.quantizer.decode(codes))
