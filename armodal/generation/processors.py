"""Pure logits processors: each maps logits (..., V) to new logits (..., V).

Removed tokens get -inf, so softmax gives them probability exactly 0 and argmax never picks
them. No function modifies its input. `process_logits` composes them for one decoding step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from armodal.generation.config import DecodingConfig

__all__ = ["apply_temperature", "top_k_filter", "top_p_filter", "apply_allowed_mask",
           "suppress_tokens", "process_logits"]

NEG_INF = float("-inf")


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by `temperature` (> 0): < 1 sharpens, > 1 flattens, 1 is the identity.

    Temperature 0 is greedy decoding, which is the caller's job (DecodingConfig.is_greedy);
    here it raises ValueError rather than dividing by zero.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}; use greedy decoding for 0")
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row, set the rest to -inf.

    k >= V keeps everything. Ties at the k-th value keep exactly k tokens (whichever
    `torch.topk` returns), so the kept set never grows past k.
    """
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if k >= logits.shape[-1]:
        return logits
    # Scatter by index, not `logits < kth_value`, so ties cannot keep more than k tokens.
    kept = torch.topk(logits, k, dim=-1).indices  # (..., k)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, kept, True)
    return logits.masked_fill(~keep, NEG_INF)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p.

    A token is kept when the probability of the tokens ranked above it is still < p, so the
    top token is always kept (even for a tiny p) and the token that crosses p is included.
    p = 1 keeps everything (without the float-rounding risk of dropping the tail).
    Ties in probability are ranked by token id (stable sort), lower id first.
    """
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {p}")
    if p >= 1:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)  # (..., V)
    # At least float32 so bf16 logits do not round the cumulative mass; float64 stays float64.
    probs = sorted_logits.softmax(dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    # Exclusive prefix sum: the probability ranked strictly above each token, (..., V).
    mass_above = torch.cat([torch.zeros_like(probs[..., :1]), probs.cumsum(-1)[..., :-1]], -1)
    keep_sorted = mass_above < p  # the top token has 0 above it, and p > 0: always kept
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return logits.masked_fill(~keep, NEG_INF)


def apply_allowed_mask(logits: Tensor, allowed: Tensor) -> Tensor:
    """Set logits of disallowed tokens to -inf.

    `allowed` is a bool tensor (V,) shared by every row, or (B, V) for per-row masks
    (e.g. the TokenSpace segment masks); it broadcasts against logits (B, V).
    """
    if allowed.dtype != torch.bool:
        raise ValueError(f"allowed mask must be a bool tensor, got dtype {allowed.dtype}")
    if allowed.shape[-1] != logits.shape[-1]:
        raise ValueError(f"allowed mask has {allowed.shape[-1]} entries in the last dim, "
                         f"expected the vocabulary size {logits.shape[-1]}")
    return logits.masked_fill(~allowed.to(logits.device), NEG_INF)


def suppress_tokens(logits: Tensor, ids: Sequence[int]) -> Tensor:
    """Set the logits of `ids` to -inf in every row (min_new_tokens uses it on stop ids).

    An empty `ids` returns the logits unchanged. If it removes every token, the caller sees
    an all -inf row; `generate` reports that as an error rather than sampling NaNs.
    """
    if len(ids) == 0:
        return logits
    out = logits.clone()
    out[..., list(ids)] = NEG_INF
    return out


def process_logits(logits: Tensor, config: DecodingConfig, step: int,
                   allowed_mask: Tensor | None = None) -> Tensor:
    """The logits one decoding step chooses from, for rows that have `step` new tokens so far.

    Order: hard constraints first (allowed mask, stop ids blocked while step < min_new_tokens),
    then, when sampling, Hugging Face's order: temperature, top-k, top-p. Greedy returns the
    constrained temperature-1 logits untouched by temperature / top-k / top-p, which could not
    change the argmax anyway; those are also the logits greedy log-probs are reported under.
    """
    if allowed_mask is not None:
        logits = apply_allowed_mask(logits, allowed_mask)
    if step < config.min_new_tokens:
        logits = suppress_tokens(logits, config.stop_token_ids)
    if config.is_greedy:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    return logits
