"""Running a trained model past the context it was trained at.

`extend_context` rebuilds a model at a longer max_seq_len with a RoPE scaling (linear, NTK-aware
or YaRN, see armodal.rope.scaled_rope) on the very same weights: RoPE has no learned position
table, so only the rotation frequencies change.
"""

from __future__ import annotations

import dataclasses

from armodal.model import ROPE_SCALINGS, Transformer


def extend_context(model: Transformer, context: int, scaling: str | None = None,
                   factor: float | None = None) -> Transformer:
    """`model` able to read `context` positions; scaling None keeps plain RoPE (which degrades
    past the trained length), else one of ROPE_SCALINGS with `factor` (default: context over
    the trained length, at least 1). Changes `model` in place (its weights are untouched, so a
    quantized model works too) and returns it."""
    config = model.config
    trained = config.rope_original_len or config.max_seq_len
    if scaling is not None and scaling not in ROPE_SCALINGS:
        raise ValueError(f"rope scaling {scaling!r}; allowed: null, {', '.join(ROPE_SCALINGS)}")
    if context < 1:
        raise ValueError(f"context={context}; expected a positive number of positions")
    if factor is None:
        factor = max(context / trained, 1.0) if scaling is not None else 1.0
    model.set_positions(dataclasses.replace(config, max_seq_len=context, rope_scaling=scaling,
                                            rope_factor=factor, rope_original_len=trained))
    return model
