"""Pure logits processors: each maps logits (..., V) to new logits (..., V).

The penalties that need the ids so far live in `penalties.py` and are re-exported here.

Removed tokens get -inf, so softmax gives them probability exactly 0 and argmax never picks
them. No function modifies its input. `process_logits` composes them for one decoding step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from armodal.generation.config import DecodingConfig
from armodal.generation.penalties import (
    generated_part,
    no_repeat_ngram_filter,
    presence_frequency_penalty,
    repetition_penalty,
)

__all__ = ["apply_temperature", "top_k_filter", "top_p_filter", "min_p_filter", "typical_filter",
           "apply_allowed_mask", "suppress_tokens", "allowed_ids_mask", "process_logits",
           "repetition_penalty", "presence_frequency_penalty", "no_repeat_ngram_filter"]

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


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p * (the row's top probability).

    Compared in log space (logit - max logit >= log min_p), so tiny probabilities cannot
    underflow to 0. min_p = 0 returns the logits unchanged; min_p = 1 keeps exactly the tokens
    tied with the top logit. The top token is always kept. Agrees with transformers'
    `MinPLogitsWarper` (min_tokens_to_keep=1) up to rounding exactly at the threshold.
    """
    if not 0 <= min_p <= 1:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}")
    if min_p == 0:
        return logits
    top = logits.amax(dim=-1, keepdim=True)  # (..., 1)
    keep = (logits - top) >= math.log(min_p)  # (...,V); an all -inf row gives NaN -> False
    keep.scatter_(-1, logits.argmax(dim=-1, keepdim=True), True)
    return logits.masked_fill(~keep, NEG_INF)


def typical_filter(logits: Tensor, mass: float) -> Tensor:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy.

    Tokens are ranked by |-log p - H| and kept, in that order, up to and including the token
    whose cumulative probability reaches `mass`; tokens tied with that one's score are kept
    too, and the most typical token is always kept. This is transformers'
    `TypicalLogitsWarper` (min_tokens_to_keep=1) step for step, so the two agree exactly.
    mass = 1 returns the logits unchanged (HF skips the warper then). -inf logits stay removed.
    """
    if not 0 < mass <= 1:
        raise ValueError(f"typical mass must be in (0, 1], got {mass}")
    if mass >= 1:
        return logits
    log_p = logits.log_softmax(dim=-1)  # (..., V)
    # nansum: removed tokens give -inf * 0 = NaN and contribute nothing to the entropy.
    entropy = -(log_p * log_p.exp()).nansum(-1, keepdim=True)  # (..., 1)
    shifted = (-log_p - entropy).abs()  # (..., V)
    sorted_scores, order = torch.sort(shifted, dim=-1)  # most typical first
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)  # (..., V)
    last = (cumulative < mass).sum(dim=-1, keepdim=True).clamp_(max=logits.shape[-1] - 1)
    remove_sorted = sorted_scores > sorted_scores.gather(-1, last)  # (..., V)
    remove_sorted[..., :1] = False
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def allowed_ids_mask(ids: Sequence[int], vocab_size: int, device: torch.device | str = "cpu",
                     field: str = "allowed_token_ids") -> Tensor:
    """Bool mask (V,) that is True exactly at `ids`; an id outside [0, V) raises ValueError."""
    _check_ids_in_vocab(ids, vocab_size, field)
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[list(ids)] = True
    return mask


def _check_ids_in_vocab(ids: Sequence[int], vocab_size: int, field: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{field} has ids {bad[:5]} outside the vocabulary [0, {vocab_size})")


def process_logits(logits: Tensor, config: DecodingConfig, step: int,
                   allowed_mask: Tensor | None = None, history: Tensor | None = None,
                   prompt_len: Tensor | int | None = None) -> Tensor:
    """The logits one decoding step chooses from, for rows that have `step` new tokens so far.

    Args:
        logits: (B, V) next-token logits.
        config: the decoding settings.
        step: new tokens so far in every row (min_new_tokens counts against it).
        allowed_mask: bool (V,) or (B, V), e.g. the TokenSpace segment masks.
        history: (B, L) int64 ids so far (prompt then generated), -1 marking left padding.
            Required when a penalty (repetition, presence, frequency, no-repeat n-gram) is on.
        prompt_len: columns of `history` that are prompt, an int or (B,) per row; the rest
            are generated. Defaults to L - step (every row has `step` generated ids).

    Order (the order Hugging Face's `_get_logits_processor` uses, with hard constraints first):
      1. hard constraints: allowed_mask, banned_token_ids, allowed_token_ids (plus the stop
         ids), stop ids blocked while step < min_new_tokens; removals compose, so a banned
         id stays banned even when it is also allowed or a stop id;
      2. penalties, for greedy too: repetition (over the whole history), presence / frequency
         (generated ids only), no-repeat n-gram (whole history);
      3. sampling only: temperature, top-k, top-p, min-p, typical.
    Greedy returns after step 2: temperature and the truncations cannot change the argmax,
    and the step-2 logits are the ones greedy log-probs are reported under. Penalties act on
    logits, before temperature, so presence 1 at temperature 2 moves a logit by 0.5.
    """
    vocab = logits.shape[-1]
    if allowed_mask is not None:
        logits = apply_allowed_mask(logits, allowed_mask)
    if config.banned_token_ids:
        _check_ids_in_vocab(config.banned_token_ids, vocab, "banned_token_ids")
        logits = suppress_tokens(logits, config.banned_token_ids)
    if config.allowed_token_ids is not None:
        ids = config.allowed_token_ids + config.stop_token_ids
        logits = apply_allowed_mask(logits, allowed_ids_mask(ids, vocab, logits.device))
    if step < config.min_new_tokens:
        logits = suppress_tokens(logits, config.stop_token_ids)
    logits = _apply_penalties(logits, config, step, history, prompt_len)
    if config.is_greedy:
        return logits
    if config.temperature != 1.0:
        logits = apply_temperature(logits, config.temperature)
    if config.top_k is not None:
        logits = top_k_filter(logits, config.top_k)
    if config.top_p is not None:
        logits = top_p_filter(logits, config.top_p)
    if config.min_p is not None:
        logits = min_p_filter(logits, config.min_p)
    if config.typical_p is not None:
        logits = typical_filter(logits, config.typical_p)
    return logits


def _apply_penalties(logits: Tensor, config: DecodingConfig, step: int, history: Tensor | None,
                     prompt_len: Tensor | int | None) -> Tensor:
    """Step 2 of `process_logits`; raises if a penalty is on but `history` is missing."""
    if not config.uses_history:
        return logits
    if history is None:
        raise ValueError("process_logits needs `history` (the ids so far) when "
                         f"repetition_penalty={config.repetition_penalty}, presence_penalty="
                         f"{config.presence_penalty}, frequency_penalty="
                         f"{config.frequency_penalty} or no_repeat_ngram_size="
                         f"{config.no_repeat_ngram_size} is set")
    if config.repetition_penalty != 1.0:
        logits = repetition_penalty(logits, history, config.repetition_penalty)
    if config.presence_penalty != 0 or config.frequency_penalty != 0:
        if prompt_len is None:
            prompt_len = max(history.shape[1] - step, 0)
        logits = presence_frequency_penalty(logits, generated_part(history, prompt_len),
                                            config.presence_penalty, config.frequency_penalty)
    if config.no_repeat_ngram_size > 0:
        logits = no_repeat_ngram_filter(logits, history, config.no_repeat_ngram_size)
    return logits
