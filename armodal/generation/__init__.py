"""Decoding: one validated DecodingConfig, pure logits processors, generate() and stream()."""

from armodal.generation.config import DecodingConfig
from armodal.generation.generate import (
    GenerationOutput,
    TokenEvent,
    fit_to_context,
    generate,
    stream,
)
from armodal.generation.penalties import (
    no_repeat_ngram_filter,
    presence_frequency_penalty,
    repetition_penalty,
)
from armodal.generation.processors import (
    apply_allowed_mask,
    apply_temperature,
    min_p_filter,
    process_logits,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
    typical_filter,
)
from armodal.generation.stopping import StopChecker
from armodal.generation.streams import generate_codes

__all__ = [
    "DecodingConfig",
    "GenerationOutput",
    "TokenEvent",
    "StopChecker",
    "generate",
    "stream",
    "generate_codes",
    "fit_to_context",
    "apply_allowed_mask",
    "apply_temperature",
    "process_logits",
    "suppress_tokens",
    "top_k_filter",
    "top_p_filter",
    "min_p_filter",
    "typical_filter",
    "repetition_penalty",
    "presence_frequency_penalty",
    "no_repeat_ngram_filter",
]
