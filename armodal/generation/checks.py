"""Validation of a decoding request, shared by generate() and beam_search(): every check runs
before any compute and names the bad value and what is allowed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from armodal.generation.config import DecodingConfig

Prompts = Sequence[Sequence[int]] | Tensor


def check_single_stream(model: nn.Module) -> None:
    if model.config.n_streams != 1:
        raise ValueError(f"model has n_streams={model.config.n_streams}; this decoder takes "
                         "n_streams=1; multi-stream models decode with "
                         "armodal.generation.streams.generate_codes under a stream pattern")


def id_lists(prompts: Prompts, vocab: int) -> list[list[int]]:
    """Validate prompts and return them as plain lists of ints."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise ValueError(f"prompt tensor must be (B, T) int64, got shape "
                             f"{tuple(prompts.shape)} dtype {prompts.dtype}")
        rows = prompts.tolist()
    else:
        rows = [[int(i) for i in p] for p in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    for r, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {r} is empty; prompts need at least one token (e.g. bos)")
        bad = [i for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt {r} has ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return rows


def check_ids_in_vocab(config: DecodingConfig, vocab: int) -> None:
    """Every token id the config names must exist in the model's vocabulary."""
    fields = {"stop_token_ids": config.stop_token_ids, "banned_token_ids": config.banned_token_ids,
              "allowed_token_ids": config.allowed_token_ids or (),
              "stop_sequences": tuple(i for seq in config.stop_sequences for i in seq)}
    for name, ids in fields.items():
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ValueError(f"{name} has ids {bad[:5]} outside the model's vocabulary "
                             f"[0, {vocab})")


def check_mask(mask: Tensor | None, name: str, per_step: bool, n_prompts: int, vocab: int,
               repeat: int = 1, device: torch.device | str = "cpu") -> Tensor | None:
    """A bool mask shared by all prompts ((V,), or (S, V) when per_step) or one per prompt
    (a leading P axis), returned with each prompt's mask repeated for its `repeat` rows."""
    if mask is None:
        return None
    shared_dims = 2 if per_step else 1
    shape = "(S, V)" if per_step else "(V,)"
    if mask.dtype != torch.bool or mask.dim() not in (shared_dims, shared_dims + 1) or \
            mask.shape[-1] != vocab or \
            (mask.dim() == shared_dims + 1 and mask.shape[0] != n_prompts):
        raise ValueError(f"{name} must be bool, shared {shape} or one per prompt, with "
                         f"V={vocab}; got shape {tuple(mask.shape)} dtype {mask.dtype} for "
                         f"{n_prompts} prompts")
    if not mask.any(dim=-1).all():
        raise ValueError(f"{name} allows no token at all for some row or step")
    if mask.dim() == shared_dims + 1 and repeat > 1:
        mask = mask.repeat_interleave(repeat, dim=0)  # one per output row
    return mask.to(device)
