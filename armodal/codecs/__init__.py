"""Trainable neural tokenizers: vector quantizers (VQ, FSQ, residual VQ), the image VQ-VAE codec
and the causal audio codec."""

from armodal.codecs.artefact import load_codec, save_codec
from armodal.codecs.audio_codec import AudioCodec
from armodal.codecs.fsq import FSQ
from armodal.codecs.quantizers import (
    QuantizerOutput,
    VectorQuantizer,
    codebook_usage,
    usage_from_counts,
)
from armodal.codecs.rvq import ResidualVQ
from armodal.codecs.vqvae import VQVAE

__all__ = [
    "FSQ",
    "AudioCodec",
    "VQVAE",
    "QuantizerOutput",
    "ResidualVQ",
    "VectorQuantizer",
    "codebook_usage",
    "load_codec",
    "save_codec",
    "usage_from_counts",
]
