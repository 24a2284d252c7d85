"""Vector quantization of (..., D) float vectors into integer codes, and codebook statistics.

VectorQuantizer here and FSQ (armodal/codecs/fsq.py) share one contract, so a model (VQVAE,
later a residual VQ) takes either:

    forward(x (..., D)) -> QuantizerOutput(quantized (..., D), codes (...) int64, loss ())
    encode(x (..., D)) -> codes (...);  decode(codes (...)) -> (..., D)
    codebook_size: int;  dim: int;  config() -> the constructor's keyword arguments

`quantized` carries a straight-through gradient to `x`. Training-time codebook updates (EMA,
k-means initialisation, dead-code restarts) happen only in `forward` in training mode; eval mode
and encode / decode are deterministic and never change the module. Lookups run in float32 even
under autocast: bf16 distances tie often enough to flip nearest codes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QuantizerOutput", "VectorQuantizer", "codebook_usage", "usage_from_counts"]


class QuantizerOutput(NamedTuple):
    quantized: Tensor  # (..., D) straight-through: forward value of the codes, gradient of x
    codes: Tensor  # (...) int64 in [0, codebook_size)
    loss: Tensor  # () commitment (+ codebook) loss; 0 for quantizers that need none


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the codebook row closest in L2 to each row of z (N, c) -> (N,) int64."""
    # |z - e|^2 = |z|^2 - 2 z.e + |e|^2; |z|^2 is constant per row, so it drops out of argmin.
    distances = codebook.pow(2).sum(-1) - 2 * z @ codebook.T  # (N, K)
    return distances.argmin(-1)


def kmeans(x: Tensor, k: int, iters: int, l2_normalize: bool) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on x (N, c) -> centroids (k, c), counts (k,) of the last assignment.

    Seeds from k random rows (with replacement when N < k); an empty cluster keeps its
    previous centroid. With l2_normalize the centroids are renormalised (spherical k-means)."""
    n = x.shape[0]
    seed = torch.randperm(n, device=x.device)[:k] if n >= k else \
        torch.randint(n, (k,), device=x.device)
    centroids = x[seed].clone()  # (k, c)
    counts = torch.zeros(k, device=x.device)
    for _ in range(max(iters, 1)):
        assign = nearest_code(x, centroids)  # (N,)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)  # (k,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)  # (k, c)
        means = sums / counts.clamp_min(1)[:, None]
        if l2_normalize:
            means = F.normalize(means, dim=-1)
        centroids = torch.where(counts[:, None] > 0, means, centroids)
    return centroids, counts


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in a codebook of `codebook_size` vectors (van den Oord et al.).

    code_dim < dim: x is projected down to code_dim (linear) for the lookup and the code is
        projected back up (ViT-VQGAN's factorised codes: low-dimensional lookups use more codes).
    l2_normalize: inputs and codebook are L2-normalised in code space, so the lookup is by
        cosine similarity.
    ema: the codebook follows exponential moving averages of its assigned vectors (sizes and
        sums, Laplace-smoothed sizes) instead of a codebook loss; else it is a learned parameter
        trained by the codebook loss |sg(z) - e|^2.
    kmeans_init: the codebook is set by k-means on the first training batch; the `initialized`
        buffer is saved with the weights, so a loaded model is never re-initialised.
    dead_code_threshold: in training, codes whose EMA usage (assignments per batch) falls below
        it are moved onto random code-space vectors of the current batch; 0 disables restarts.
    commitment: weight of |z - sg(e)|^2, which keeps the encoder close to its codes.
    """

    def __init__(self, codebook_size: int, dim: int, code_dim: int | None = None,
                 l2_normalize: bool = False, ema: bool = True, decay: float = 0.99,
                 kmeans_init: bool = True, kmeans_iters: int = 10,
                 dead_code_threshold: float = 1.0, commitment: float = 0.25, eps: float = 1e-5):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size={codebook_size}; a codebook needs at least 2 codes")
        if dim < 1 or (code_dim is not None and not 1 <= code_dim <= dim):
            raise ValueError(f"dim={dim}, code_dim={code_dim}; need dim >= 1 and "
                             f"1 <= code_dim <= dim (or code_dim=None for no projection)")
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay={decay}; the EMA decay must lie in (0, 1)")
        if dead_code_threshold < 0:
            raise ValueError(f"dead_code_threshold={dead_code_threshold}; must be >= 0")
        self.codebook_size, self.dim = codebook_size, dim
        self.code_dim = code_dim or dim
        self.l2_normalize, self.ema, self.decay, self.eps = l2_normalize, ema, decay, eps
        self.kmeans_init, self.kmeans_iters = kmeans_init, kmeans_iters
        self.dead_code_threshold, self.commitment = dead_code_threshold, commitment
        project = self.code_dim != dim
        self.project_in = nn.Linear(dim, self.code_dim) if project else nn.Identity()
        self.project_out = nn.Linear(self.code_dim, dim) if project else nn.Identity()

        codebook = torch.randn(codebook_size, self.code_dim)  # (K, c)
        if l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        if ema:
            self.register_buffer("codebook", codebook)
            # Each code starts as if it had been assigned itself once, so sums / sizes == codes.
            self.register_buffer("embed_sum", codebook.clone())  # (K, c) EMA of assigned sums
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("cluster_size", torch.ones(codebook_size))  # (K,) EMA usage
        self.register_buffer("initialized", torch.tensor(not kmeans_init))

    def config(self) -> dict:
        """Constructor keyword arguments: enough to rebuild this quantizer's architecture."""
        return {"codebook_size": self.codebook_size, "dim": self.dim,
                "code_dim": None if self.code_dim == self.dim else self.code_dim,
                "l2_normalize": self.l2_normalize, "ema": self.ema, "decay": self.decay,
                "kmeans_init": self.kmeans_init, "kmeans_iters": self.kmeans_iters,
                "dead_code_threshold": self.dead_code_threshold,
                "commitment": self.commitment, "eps": self.eps}

    def codebook_vectors(self) -> Tensor:
        """The codebook as the lookup sees it (K, code_dim): unit rows in l2_normalize mode."""
        codebook = self.codebook.float()
        return F.normalize(codebook, dim=-1) if self.l2_normalize else codebook

    def _to_code_space(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"input has last dimension {x.shape[-1]}; this quantizer takes "
                             f"(..., {self.dim}) vectors")
        z = self.project_in(x.float().reshape(-1, self.dim))  # (N, c)
        return F.normalize(z, dim=-1) if self.l2_normalize else z

    def encode(self, x: Tensor) -> Tensor:
        """(..., D) -> (...) int64 codes of the nearest codebook vectors."""
        with torch.autocast(x.device.type, enabled=False):
            return nearest_code(self._to_code_space(x), self.codebook_vectors()) \
                .reshape(x.shape[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        """(...) int64 codes -> (..., D) vectors (codebook lookup, then the up-projection)."""
        check_codes(codes, self.codebook_size)
        with torch.autocast(codes.device.type, enabled=False):
            return self.project_out(self.codebook_vectors()[codes])

    def forward(self, x: Tensor) -> QuantizerOutput:
        with torch.autocast(x.device.type, enabled=False):
            z = self._to_code_space(x)  # (N, c)
            if self.training and not bool(self.initialized):
                self._kmeans_init(z.detach())
            codebook = self.codebook_vectors()  # (K, c)
            codes = nearest_code(z.detach(), codebook.detach())  # (N,) argmin has no gradient
            zq = codebook[codes]  # (N, c)
            loss = self.commitment * F.mse_loss(z, zq.detach())
            if not self.ema:
                loss = loss + F.mse_loss(zq, z.detach())
            if self.training:
                self._update(z.detach(), codes)
            quantized = self.project_out(z + (zq - z).detach())  # (N, D) straight-through
        return QuantizerOutput(quantized.reshape(x.shape).to(x.dtype),
                               codes.reshape(x.shape[:-1]), loss)

    @torch.no_grad()
    def _kmeans_init(self, z: Tensor) -> None:
        centroids, counts = kmeans(z, self.codebook_size, self.kmeans_iters, self.l2_normalize)
        self.codebook.data.copy_(centroids)
        # Empty clusters count as one assignment, so the EMA ratio stays the centroid.
        sizes = counts.clamp_min(1.0)
        self.cluster_size.copy_(sizes)
        if self.ema:
            self.embed_sum.copy_(centroids * sizes[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, z: Tensor, codes: Tensor) -> None:
        counts = torch.bincount(codes, minlength=self.codebook_size).float()  # (K,)
        self.cluster_size.lerp_(counts, 1 - self.decay)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, z)  # (K, c)
            self.embed_sum.lerp_(sums, 1 - self.decay)
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            n = self.cluster_size.sum()
            sizes = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.embed_sum / sizes[:, None])
        self._restart_dead_codes(z)

    def _restart_dead_codes(self, z: Tensor) -> None:
        dead = self.cluster_size < self.dead_code_threshold  # (K,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        samples = z[torch.randint(z.shape[0], (n_dead,), device=z.device)]  # (n_dead, c)
        self.codebook.data[dead] = samples
        # A restarted code gets one threshold's worth of usage: it survives a batch or two
        # without assignments before it is moved again.
        self.cluster_size[dead] = max(self.dead_code_threshold, self.eps)
        if self.ema:
            self.embed_sum[dead] = samples * self.cluster_size[dead][:, None]


def check_codes(codes: Tensor, codebook_size: int) -> None:
    """Raise unless codes is an integer tensor with values in [0, codebook_size)."""
    if codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"codes have dtype {codes.dtype}; expected an integer tensor")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= codebook_size):
        raise ValueError(f"codes span [{int(codes.min())}, {int(codes.max())}]; this codebook "
                         f"takes codes in [0, {codebook_size})")


def usage_from_counts(counts: Tensor) -> tuple[float, float]:
    """Per-code assignment counts (K,) -> (fraction of codes used, codebook perplexity).

    Perplexity is exp(entropy) of the code distribution: K when all codes are equally used,
    1 when one code takes everything."""
    total = counts.sum()
    if total <= 0:
        raise ValueError("no codes were counted; usage needs at least one code")
    p = counts.double() / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).double().mean()), math.exp(float(entropy))


def codebook_usage(codes: Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of the codebook used, codebook perplexity) over a batch of codes of any shape."""
    check_codes(codes, codebook_size)
    return usage_from_counts(torch.bincount(codes.flatten().long(), minlength=codebook_size))
