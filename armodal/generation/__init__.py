"""Decoding: one validated DecodingConfig, pure logits processors, and generate()."""

from armodal.generation.config import DecodingConfig
from armodal.generation.generate import GenerationOutput, fit_to_context, generate
from armodal.generation.processors import (
    apply_allowed_mask,
    apply_temperature,
    process_logits,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "DecodingConfig",
    "GenerationOutput",
    "generate",
    "fit_to_context",
    "apply_allowed_mask",
    "apply_temperature",
    "process_logits",
    "suppress_tokens",
    "top_k_filter",
    "top_p_filter",
]
