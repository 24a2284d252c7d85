"""Decoding: one validated DecodingConfig, pure logits processors, and generate()."""

from armodal.generation.config import DecodingConfig
from armodal.generation.generate import GenerationOutput, generate
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
    "apply_allowed_mask",
    "apply_temperature",
    "process_logits",
    "suppress_tokens",
    "top_k_filter",
    "top_p_filter",
]
