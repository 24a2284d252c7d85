"""Train / val split of N items, shared by the image and audio sources (text splits documents
inside its shards, armodal/data/shards.py)."""

from __future__ import annotations

import torch
from torch import Tensor

SPLIT_METHODS = ("random", "tail")


def split_indices(n: int, val_fraction: float, method: str, seed: int,
                  what: str) -> tuple[Tensor, Tensor]:
    """(train, val) int64 indices, round(n * val_fraction) of them val, each ascending.

    "tail": the last items (a fixed held-out block, e.g. MNIST's 9,000 / 1,000 split of its
    test file, or a speech corpus's last utterances); "random": the first val items of a seeded
    permutation. `what` names the caller and its items in errors ("split_images: ... images")."""
    if method not in SPLIT_METHODS:
        raise ValueError(f"{what}: method must be 'random' or 'tail', got {method!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"{what}: val_fraction must be in (0, 1), got {val_fraction}")
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise ValueError(f"{what}: val_fraction={val_fraction} of {n} gives {n_val} val and "
                         f"{n - n_val} train; both must be non-empty")
    if method == "tail":
        return torch.arange(n - n_val), torch.arange(n - n_val, n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:].sort().values, order[:n_val].sort().values
