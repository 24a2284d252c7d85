"""Pure penalties that look at the ids so far: repetition, presence / frequency, no-repeat n-gram.

Every function takes logits (B, V) and the ids of each row, `history` (B, L) int64, where -1
marks padding (left padding of ragged prompts); pads never count as tokens. Ids >= V (an
embedding table larger than the output head) are ignored too, since they cannot be generated.
No function modifies its input. `processors.process_logits` composes them with the filters.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["repetition_penalty", "presence_frequency_penalty", "no_repeat_ngram_filter",
           "generated_part"]

NEG_INF = float("-inf")


def _spare_column(ids: Tensor, vocab: int) -> Tensor:
    """Map pads (< 0) and ids >= vocab to column `vocab`, a spare column callers drop."""
    return torch.where((ids < 0) | (ids >= vocab), vocab, ids)


def _check_history(logits: Tensor, history: Tensor, name: str) -> None:
    if logits.dim() != 2 or history.dim() != 2 or history.shape[0] != logits.shape[0]:
        raise ValueError(f"{name} expects logits (B, V) and ids (B, L) with the same B, got "
                         f"logits {tuple(logits.shape)} and ids {tuple(history.shape)}")
    if history.dtype != torch.long:
        raise ValueError(f"{name} expects int64 ids, got dtype {history.dtype}")


def generated_part(history: Tensor, prompt_len: Tensor | int) -> Tensor:
    """history (B, L) with every prompt position set to -1, so only generated ids count.

    `prompt_len` is an int (the same padded prompt width for every row) or a (B,) tensor;
    columns < prompt_len are prompt. With an int the prompt columns are simply sliced off.
    """
    if isinstance(prompt_len, int):
        if prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
        return history[:, prompt_len:]
    columns = torch.arange(history.shape[1], device=history.device)  # (L,)
    is_prompt = columns[None, :] < prompt_len.to(history.device)[:, None]  # (B, L)
    return history.masked_fill(is_prompt, -1)


def repetition_penalty(logits: Tensor, history: Tensor, penalty: float) -> Tensor:
    """CTRL / Hugging Face repetition penalty over every id in `history` (prompt included).

    Each id present at least once (however often) gets its logit divided by `penalty` when
    positive and multiplied by it when negative, so penalty > 1 always makes it less likely and
    0 < penalty < 1 more likely. A logit of exactly 0 stays 0, -inf stays -inf. penalty = 1 and
    an all-pad or empty history return the logits unchanged. Matches transformers'
    `RepetitionPenaltyLogitsProcessor` on rows without pads.
    """
    if not penalty > 0:
        raise ValueError(f"repetition penalty must be > 0, got {penalty}")
    _check_history(logits, history, "repetition_penalty")
    if penalty == 1.0 or history.shape[1] == 0:
        return logits
    b, v = logits.shape
    seen = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)  # (B, V + spare)
    seen.scatter_(1, _spare_column(history.to(logits.device), v), True)
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)  # (B, V)
    return torch.where(seen[:, :v], penalized, logits)


def presence_frequency_penalty(logits: Tensor, generated: Tensor, presence: float,
                               frequency: float) -> Tensor:
    """OpenAI penalties over the generated ids (B, G) only; pass the prompt masked or cut off.

    logit[id] -= presence * (count[id] > 0) + frequency * count[id], with count the number of
    times id occurs in the row (-1 pads never count). Negative values reward repetition;
    both 0 return the logits unchanged.
    """
    _check_history(logits, generated, "presence_frequency_penalty")
    if (presence == 0 and frequency == 0) or generated.shape[1] == 0:
        return logits
    b, v = logits.shape
    ids = _spare_column(generated.to(logits.device), v)  # (B, G)
    counts = torch.zeros(b, v + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=logits.dtype))
    counts = counts[:, :v]  # (B, V)
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts


def no_repeat_ngram_filter(logits: Tensor, history: Tensor, n: int) -> Tensor:
    """Ban every token that would complete an n-gram already present in the row.

    The row's last n - 1 ids are matched against each earlier window of n ids, and each
    matching window bans its last id (-inf), as transformers' `NoRepeatNGramLogitsProcessor`
    does over the whole row, prompt included. Windows that contain a pad never match, and a row
    with fewer than n - 1 real ids bans nothing. n = 1 bans every id already in the row;
    n = 0 is off (returns the logits unchanged).
    """
    if n < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {n}")
    _check_history(logits, history, "no_repeat_ngram_filter")
    b, length = history.shape
    if n == 0 or length < n:
        return logits
    v = logits.shape[-1]
    history = history.to(logits.device)
    # Vectorised instead of HF's old per-row dict: one comparison of the suffix with all windows.
    prefix = history[:, length - (n - 1):]  # (B, n-1)
    windows = history.unfold(1, n, 1)  # (B, W, n), W = L - n + 1
    matches = (windows[..., :-1] == prefix[:, None, :]).all(-1)  # (B, W)
    # A pad in the window or in the suffix means no real n-gram there.
    matches &= (windows >= 0).all(-1) & (prefix >= 0).all(-1, keepdim=True)
    banned_ids = torch.where(matches, _spare_column(windows[..., -1], v), v)  # (B, W)
    banned = torch.zeros(b, v + 1, dtype=torch.bool, device=logits.device)
    banned.scatter_(1, banned_ids, True)
    return logits.masked_fill(banned[:, :v], NEG_INF)
