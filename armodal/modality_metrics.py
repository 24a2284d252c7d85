"""Per-modality loss weights and metrics for mixed-modality sequences.

Every learned target belongs to exactly one group: the modality whose ids it is in, or
"structure" for the shared specials and segment markers (<bos>, <eos>, <boi>, <eot>, ...:
predicting *which* segment comes next, and where one ends). So the groups' losses, weighted by
their token counts, sum to the total loss, and a run reports e.g. `val/loss_text` and
`val/bits_per_dim_image` side by side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from armodal.tokenizers.space import TokenSpace

__all__ = ["STRUCTURE", "ModalityGroups"]

STRUCTURE = "structure"
IGNORE_INDEX = -100  # as armodal.lit: targets carrying no loss


@dataclass
class ModalityGroups:
    """Which group each global id is in, each group's loss weight and its bits unit.

    names: the modalities in layout order, then "structure".
    owner: (V,) int64 group index of each global id.
    weights: (G,) float loss weight per group (1 everywhere: the plain token mean).
    units: per group, (unit name, units per token), e.g. ("byte", 1.0) or ("dim", 16.0).
    """

    names: tuple[str, ...]
    owner: Tensor
    weights: Tensor
    units: tuple[tuple[str, float], ...]

    @classmethod
    def from_space(cls, space: TokenSpace, weights: Mapping[str, float] | None = None,
                   units: Mapping[str, tuple[str, float]] | None = None) -> ModalityGroups:
        names = (*space.modalities, STRUCTURE)
        weights = dict(weights or {})
        unknown = sorted(set(weights) - set(names))
        if unknown:
            raise ValueError(f"loss_weights names {unknown}; the groups are {list(names)}")
        for name, w in weights.items():
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ValueError(f"loss_weights.{name}={w!r}: expected a finite number >= 0")
        if not any(weights.get(n, 1.0) > 0 for n in names):
            raise ValueError("loss_weights: at least one group needs a weight > 0")
        owner = torch.full((space.vocab_size,), len(names) - 1, dtype=torch.int64)
        for g, m in enumerate(space.modalities):
            lo = space.offset(m)
            owner[lo: lo + space.modalities[m]] = g
        unit_of = dict(units or {})
        return cls(names, owner,
                   torch.tensor([float(weights.get(n, 1.0)) for n in names]),
                   tuple(unit_of.get(n, ("token", 1.0)) for n in names))

    def groups_of(self, targets: Tensor) -> Tensor:
        """(N,) group index per target; -1 where the target is not learned."""
        learned = targets != IGNORE_INDEX
        out = torch.full_like(targets, -1)
        out[learned] = self.owner.to(targets.device)[targets[learned]]
        return out

    def weighted_loss(self, nll: Tensor, targets: Tensor) -> Tensor:
        """Mean NLL over learned targets, each weighted by its group's weight: with every
        weight 1 it is the plain mean the unweighted loss computes."""
        group = self.groups_of(targets)
        learned = group >= 0
        w = self.weights.to(nll.device)[group[learned]]
        return (nll[learned] * w).sum() / w.sum().clamp(min=1e-12)

    def sums(self, nll: Tensor, targets: Tensor) -> Tensor:
        """(G, 2) float64: summed NLL and count of learned targets per group."""
        group = self.groups_of(targets)
        learned = group >= 0
        g = len(self.names)
        nll_sum = torch.zeros(g, dtype=torch.float64, device=nll.device)
        nll_sum.index_add_(0, group[learned], nll[learned].double())
        count = torch.bincount(group[learned], minlength=g).double()
        return torch.stack([nll_sum, count], 1)

    def metrics(self, sums: Tensor, prefix: str = "val") -> dict[str, float]:
        """`{prefix}/loss_<group>` (nats per token) and `{prefix}/bits_per_<unit>_<group>`
        for every group with targets."""
        out: dict[str, float] = {}
        for (total, count), name, (unit, per_token) in zip(sums.tolist(), self.names, self.units):
            if count > 0:
                out[f"{prefix}/loss_{name}"] = total / count
                out[f"{prefix}/bits_per_{unit}_{name}"] = total / count / math.log(2) / per_token
        return out
