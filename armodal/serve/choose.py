"""choose_tokens: one decoding step for rows that each carry their own settings.

Offline decoding (armodal.generation.generate) runs one DecodingConfig over a whole batch;
here every row may come from another request. Rows whose settings make `process_logits` act
the same are processed together, then each row draws its token from its own RowSampler, so
a row's tokens depend only on its request (prompt, settings, seed), as offline.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import Tensor

from armodal.generation import DecodingConfig, process_logits
from armodal.generation.sampling import RowSampler

__all__ = ["RowDecoding", "Choice", "choose_tokens"]


@dataclass(eq=False)
class RowDecoding:
    """One output row's decoding state: what choose_tokens reads; the caller appends tokens.

    Attributes:
        config: the request's settings.
        sampler: the row's random stream (None when greedy).
        history: prompt then generated ids.
        prompt_len: how many of `history` are prompt.
    """

    config: DecodingConfig
    sampler: RowSampler | None
    history: list[int]
    prompt_len: int

    def __post_init__(self) -> None:
        # process_logits reads `step` only to block stop ids while step < min_new_tokens (the
        # prompt length is passed explicitly). So the per-phase settings, called with step 0,
        # act exactly as the request's config at its real step, and rows of different requests
        # with equal phase settings are processed in one call.
        phase = dataclasses.replace(self.config, seed=None, max_new_tokens=1, min_new_tokens=0,
                                    stop_sequences=(), stop_strings=(),
                                    num_return_sequences=1, top_logprobs=0)
        self._phases = (dataclasses.replace(phase, min_new_tokens=1), phase)

    @property
    def step(self) -> int:
        """New tokens so far."""
        return len(self.history) - self.prompt_len

    @property
    def settings(self) -> DecodingConfig:
        """What process_logits runs with at this step (see __post_init__), at step 0."""
        return self._phases[self.step >= self.config.min_new_tokens]


@dataclass
class Choice:
    """A row's chosen token, its logprob, and the top alternatives when asked for."""

    token: int
    logprob: float
    top: list[tuple[int, float]] | None


def choose_tokens(logits: Tensor, rows: list[RowDecoding]) -> list[Choice | None]:
    """logits (R, V), one row per entry of `rows` -> each row's choice, in order.

    None marks a row for which no token is allowed (bans and blocked stop ids removed the
    whole vocabulary); offline `generate` raises there, the caller fails that request.
    """
    groups: dict[DecodingConfig, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[row.settings].append(i)
    choices: list[Choice | None] = [None] * len(rows)
    for settings, members in groups.items():
        index = torch.tensor(members, device=logits.device)
        part = logits.index_select(0, index).float()  # (G, V)
        history, prompt_len = _history([rows[i] for i in members], settings, logits.device)
        part = process_logits(part, settings, 0, history=history, prompt_len=prompt_len)
        blocked = torch.isneginf(part).all(dim=-1).tolist()  # (G,)
        logp = part.log_softmax(dim=-1)  # (G, V)
        if settings.is_greedy:
            tokens = part.argmax(-1)  # (G,); on the logits, as offline (logp may round ties)
        else:
            tokens = torch.cat([rows[i].sampler.sample(logp[j:j + 1].exp())
                                for j, i in enumerate(members)])  # (G,)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1).tolist()  # (G,)
        k = max(rows[i].config.top_logprobs for i in members)
        top = logp.topk(k, dim=-1) if k else None
        for j, i in enumerate(members):
            if blocked[j]:
                continue
            want = rows[i].config.top_logprobs
            alternatives = None if not want else list(zip(top.indices[j, :want].tolist(),
                                                          top.values[j, :want].tolist()))
            choices[i] = Choice(int(tokens[j]), chosen[j], alternatives)
    return choices


def _history(rows: list[RowDecoding], settings: DecodingConfig, device):
    """(G, L) left-padded ids (-1 on pads) and (G,) prompt columns, when a penalty reads them."""
    if not settings.uses_history:
        return None, None
    width = max(len(r.history) for r in rows)
    ids = torch.tensor([[-1] * (width - len(r.history)) + r.history for r in rows],
                       dtype=torch.long, device=device)  # (G, L)
    prompt_len = torch.tensor([width - len(r.history) + r.prompt_len for r in rows],
                              device=device)  # (G,)
    return ids, prompt_len
