"""Trainable neural tokenizers: vector quantizers (VQ, FSQ) and the image VQ-VAE codec."""

from armodal.codecs.artefact import load_codec, save_codec
from armodal.codecs.fsq import FSQ
from armodal.codecs.quantizers import (
    QuantizerOutput,
    VectorQuantizer,
    codebook_usage,
    usage_from_counts,
)
from armodal.codecs.vqvae import VQVAE

__all__ = [
    "FSQ",
    "VQVAE",
    "QuantizerOutput",
    "VectorQuantizer",
    "codebook_usage",
    "load_codec",
    "save_codec",
    "usage_from_counts",
]
