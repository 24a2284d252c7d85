"""Drawing tokens: per-request random streams, and classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

_GOLDEN = 0x9E3779B97F4A7C15  # spreads the k-th sample's seed far from the (k+1)-th


class RowSampler:
    """One torch.Generator per output row, so a request's draws depend only on its own seed
    (and which of its num_return_sequences samples it is), never on the rest of the batch.

    Sampling is by inverse CDF with one uniform per row: tokens with probability 0 are never
    drawn (searchsorted with right=True skips flat stretches of the CDF).
    """

    def __init__(self, seeds: list[int | None], sample_index: list[int],
                 device: torch.device | str = "cpu"):
        self.generators = []
        for seed, k in zip(seeds, sample_index):
            if seed is None:  # unseeded: fresh but reproducible under torch.manual_seed
                seed = int(torch.randint(2**62, ()).item())
            else:
                seed = (seed + k * _GOLDEN) % 2**63
            self.generators.append(torch.Generator(device=device).manual_seed(seed))
        self.device = device

    def sample(self, probs: Tensor) -> Tensor:
        """probs (R, V), rows summing to ~1 -> one token id per row (R,)."""
        u = torch.cat([torch.rand(1, generator=g, device=self.device)
                       for g in self.generators])  # (R,)
        cdf = probs.double().cumsum(-1)  # (R, V); float64 so V-long sums stay exact enough
        target = (u.double() * cdf[:, -1])[:, None]  # (R, 1), strictly below each row's total
        return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=probs.shape[-1] - 1)


def guided_logits(logits: Tensor, n_rows: int, scale: float) -> Tensor:
    """Classifier-free guidance over a batch of [conditional rows; unconditional twins].

    logits (R or 2R, V) -> (R, V): log p_u + scale * (log p_c - log p_u) on log-softmaxed
    logits (as Hugging Face's guidance processor), or the logits unchanged without twins.
    """
    if logits.shape[0] == n_rows:
        return logits
    cond = logits[:n_rows].log_softmax(-1)
    uncond = logits[n_rows:2 * n_rows].log_softmax(-1)
    return uncond + scale * (cond - uncond)
