"""ResidualVQ: K vector quantizers in a chain, each coding what the previous ones left over.

    x (B, T, D) -> level 0 codes x, level 1 codes x - q0, level 2 codes x - q0 - q1, ...
    quantized = q0 + q1 + ... + q_{n-1};  codes (B, K, T), one row of codes per level

The first levels carry the coarse shape and each later one a finer correction, so decoding only
the first n_q levels is a valid lower-bitrate reconstruction. Quantizer dropout (SoundStream)
trains exactly that: each training item keeps a random number of levels n_q in [1, K], so one
model serves every bitrate from 1 to K levels.

Each level is a VectorQuantizer (armodal/codecs/quantizers.py) and keeps its EMA codebook,
k-means initialisation and dead-code restarts. Under dropout a level only ever sees the items
that use it: the dropped items' residuals never enter its EMA counts, its k-means or its
restarts, so a late level's usage statistics are not diluted by items that skipped it.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from armodal.codecs.quantizers import QuantizerOutput, VectorQuantizer, check_codes

__all__ = ["DROPPED", "ResidualVQ"]

DROPPED = -1  # the code forward() reports for a level an item skipped under quantizer dropout


class ResidualVQ(nn.Module):
    """K VectorQuantizers on successive residuals, with optional quantizer dropout.

    n_levels: K, the number of quantizers (codes per frame at the full bitrate).
    codebook_size, dim: shared by every level; dim is the width of the vectors quantized.
    quantizer_dropout: in training, item b uses only the first n_q[b] levels, n_q[b] uniform in
        [1, K]; eval mode always uses all K.
    dropout_fraction: the share of training items that get a random n_q; the others use all K
        levels (DAC's compromise: full-bitrate quality suffers less). 1.0 is SoundStream's.
    **vq_kwargs: VectorQuantizer arguments (ema, decay, kmeans_init, dead_code_threshold,
        commitment, code_dim, ...), the same for every level.
    """

    def __init__(self, n_levels: int, codebook_size: int, dim: int,
                 quantizer_dropout: bool = True, dropout_fraction: float = 1.0, **vq_kwargs):
        super().__init__()
        if n_levels < 1:
            raise ValueError(f"n_levels={n_levels}; a residual VQ needs at least 1 level")
        if not 0.0 <= dropout_fraction <= 1.0:
            raise ValueError(f"dropout_fraction={dropout_fraction}; must lie in [0, 1]")
        self.n_levels, self.codebook_size, self.dim = n_levels, codebook_size, dim
        self.quantizer_dropout, self.dropout_fraction = quantizer_dropout, dropout_fraction
        self.levels = nn.ModuleList(VectorQuantizer(codebook_size, dim, **vq_kwargs)
                                    for _ in range(n_levels))

    def config(self) -> dict:
        """Constructor keyword arguments: enough to rebuild this quantizer's architecture."""
        vq = self.levels[0].config()
        del vq["codebook_size"], vq["dim"]
        return {"n_levels": self.n_levels, "codebook_size": self.codebook_size, "dim": self.dim,
                "quantizer_dropout": self.quantizer_dropout,
                "dropout_fraction": self.dropout_fraction, **vq}

    def _check_n_q(self, n_q: int | None) -> int:
        n_q = self.n_levels if n_q is None else n_q
        if not 1 <= n_q <= self.n_levels:
            raise ValueError(f"n_q={n_q}; this residual VQ has levels 1..{self.n_levels}")
        return n_q

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected latents (B, T, {self.dim}), got shape {tuple(x.shape)}")

    def sample_levels(self, batch: int, device: torch.device) -> Tensor:
        """Levels each item uses in this forward (B,) int64: random under dropout in training,
        else all K."""
        n_q = torch.full((batch,), self.n_levels, dtype=torch.long, device=device)
        if self.training and self.quantizer_dropout and self.n_levels > 1:
            random = torch.randint(1, self.n_levels + 1, (batch,), device=device)
            chosen = torch.rand(batch, device=device) < self.dropout_fraction
            n_q = torch.where(chosen, random, n_q)
        return n_q

    def forward(self, x: Tensor) -> QuantizerOutput:
        """x (B, T, D) -> (quantized (B, T, D), codes (B, K, T), loss ()).

        quantized sums the levels each item used, with a straight-through gradient to x.
        codes holds DROPPED (-1) where an item skipped a level (training under dropout only).
        loss sums the levels' commitment losses, each a mean over the items that used it."""
        self._check_input(x)
        batch, frames, _ = x.shape
        n_q = self.sample_levels(batch, x.device)  # (B,)
        residual = x
        quantized = torch.zeros_like(x)  # (B, T, D)
        codes = torch.full((batch, self.n_levels, frames), DROPPED, dtype=torch.long,
                           device=x.device)
        loss = x.new_zeros((), dtype=torch.float32)
        for k, level in enumerate(self.levels):
            active = n_q > k  # (B,) the items that use level k
            if bool(active.all()):
                q, c, level_loss = level(residual)  # (B, T, D), (B, T)
            elif bool(active.any()):
                # Only the active items reach the quantizer: its EMA, k-means and restarts
                # count exactly the vectors it codes.
                q_active, c_active, level_loss = level(residual[active])
                q = torch.zeros_like(residual).index_put((active,), q_active)
                c = torch.full_like(codes[:, k], DROPPED).index_put((active,), c_active)
            else:
                break  # levels are used in order: no item uses this one or any later one
            quantized = quantized + q
            codes[:, k] = c
            loss = loss + level_loss
            # The next level codes what this one missed; no gradient runs along the chain.
            residual = residual - q.detach()
        return QuantizerOutput(quantized, codes, loss)

    @torch.no_grad()
    def encode(self, x: Tensor, n_q: int | None = None) -> Tensor:
        """x (B, T, D) -> int64 codes (B, n_q, T) of the first n_q levels (default all K).

        Never updates the codebooks, whatever the training mode."""
        self._check_input(x)
        residual, codes = x, []
        for level in self.levels[:self._check_n_q(n_q)]:
            c = level.encode(residual)  # (B, T)
            residual = residual - level.decode(c).to(residual.dtype)
            codes.append(c)
        return torch.stack(codes, 1)  # (B, n_q, T)

    def decode(self, codes: Tensor) -> Tensor:
        """int64 codes (B, K', T) of the first K' levels -> (B, T, D); fewer levels, coarser."""
        if codes.dim() != 3:
            raise ValueError(f"decode takes codes (B, levels, T), got shape {tuple(codes.shape)}")
        self._check_n_q(codes.shape[1])
        check_codes(codes, self.codebook_size)
        # (B, T, D) per level, summed: the levels are additive by construction.
        levels = self.levels[:codes.shape[1]]
        return sum(level.decode(codes[:, k]) for k, level in enumerate(levels))
