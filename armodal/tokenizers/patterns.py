"""Stream patterns: how K parallel code streams are laid out into model steps.

An audio codec (or a per-dimension action tokenizer) gives codes (K, T): level k of frame t,
local ids in [0, codebook_size). The transformer sees one column of `n_streams` ids per step;
a pattern decides which code sits in which (stream, step) slot (MusicGen's patterns):

    flatten   one stream, frame t's K codes are K consecutive steps: (1, K*T). Level k's code c
              becomes k * codebook_size + c, so every level has its own id range and the step
              masks (and the model) know which level comes next.
    delay     K streams, level k shifted right by k steps: (K, T + K - 1). One step per frame,
              and level k of frame t is produced after levels < k of the same frame.
    parallel  K streams, no shift: (K, T). All levels of a frame are produced at once.

Every pattern is described by two maps, the frame and the level each slot holds (-1 for an
empty slot); `apply` and `revert` are one gather each over those maps, so they are exact
inverses and batched over any leading dims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["PATTERN_KINDS", "StreamPattern", "CodebookPattern", "stream_pattern"]

PATTERN_KINDS = ("flatten", "delay", "parallel")


class StreamPattern(Protocol):
    """What generation and data preparation need from a pattern (structural)."""

    kind: str
    n_levels: int  # K
    codebook_size: int

    @property
    def n_streams(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...
    def length(self, n_frames: int) -> int: ...
    def frames(self, length: int) -> int: ...
    def apply(self, codes: Tensor, fill: int) -> Tensor: ...
    def revert(self, laid: Tensor) -> Tensor: ...
    def slot_frames(self, n_frames: int) -> Tensor: ...
    def slot_levels(self, n_frames: int) -> Tensor: ...


@dataclass(frozen=True)
class CodebookPattern:
    """K codebook levels of `codebook_size` codes each, laid out as `kind` (PATTERN_KINDS)."""

    kind: str
    n_levels: int
    codebook_size: int

    def __post_init__(self) -> None:
        if self.kind not in PATTERN_KINDS:
            raise ValueError(f"unknown stream pattern kind {self.kind!r}; allowed: "
                             f"{', '.join(PATTERN_KINDS)}")
        for name in ("n_levels", "codebook_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def n_streams(self) -> int:
        """Model streams: 1 for flatten, K otherwise."""
        return 1 if self.kind == "flatten" else self.n_levels

    @property
    def vocab_size(self) -> int:
        """Local ids per model stream: K * codebook_size for flatten, codebook_size otherwise."""
        return self.n_levels * self.codebook_size if self.kind == "flatten" else self.codebook_size

    @property
    def _level_stride(self) -> int:
        # flatten gives level k the id range [k * codebook_size, (k + 1) * codebook_size)
        return self.codebook_size if self.kind == "flatten" else 0

    def length(self, n_frames: int) -> int:
        """Model steps that n_frames frames take: K*T, T + K - 1 or T."""
        if n_frames < 0:
            raise ValueError(f"n_frames must be >= 0, got {n_frames}")
        k = self.n_levels
        return {"flatten": k * n_frames, "delay": n_frames + k - 1, "parallel": n_frames}[self.kind]

    def frames(self, length: int) -> int:
        """Inverse of `length`; ValueError for a length no whole number of frames gives."""
        k = self.n_levels
        n = {"flatten": length // k, "delay": length - k + 1, "parallel": length}[self.kind]
        if n < 0 or self.length(n) != length:
            raise ValueError(f"{length} steps are not a whole number of frames for the "
                             f"{self.kind} pattern with {k} levels")
        return n

    def slot_frames(self, n_frames: int) -> Tensor:
        """(n_streams, L) int64: the frame each slot holds, -1 for an empty slot."""
        steps = torch.arange(self.length(n_frames))
        if self.kind == "flatten":
            return (steps // self.n_levels)[None]
        if self.kind == "parallel":
            return steps[None].expand(self.n_levels, -1).clone()
        frame = steps[None] - torch.arange(self.n_levels)[:, None]  # (K, L): step s - level k
        return frame.masked_fill((frame < 0) | (frame >= n_frames), -1)

    def slot_levels(self, n_frames: int) -> Tensor:
        """(n_streams, L) int64: the level each slot holds, -1 for an empty slot."""
        if self.kind == "flatten":
            return (torch.arange(self.length(n_frames)) % self.n_levels)[None]
        levels = torch.arange(self.n_levels)[:, None].expand(-1, self.length(n_frames))
        return levels.masked_fill(self.slot_frames(n_frames) < 0, -1)

    def apply(self, codes: Tensor, fill: int) -> Tensor:
        """Lay codes (..., K, T) out as (..., n_streams, L); empty slots hold `fill`.

        Callers shift codes to global ids first (codes + offset) and pass the global pad id,
        or pass fill=-1 to mark empty slots.
        """
        self._check_axis(codes, -2, self.n_levels, "codes", "(..., K, T)")
        n_frames = codes.shape[-1]
        frames, levels = self.slot_frames(n_frames), self.slot_levels(n_frames)
        frames, levels = frames.to(codes.device), levels.to(codes.device)
        laid = torch.full((*codes.shape[:-2], *frames.shape), fill, dtype=codes.dtype,
                          device=codes.device)
        filled = frames >= 0  # (n_streams, L)
        values = codes[..., levels[filled], frames[filled]]  # (..., N filled slots)
        laid[..., filled] = values + levels[filled] * self._level_stride
        return laid

    def revert(self, laid: Tensor) -> Tensor:
        """Codes (..., K, T) back from a full layout (..., n_streams, L): apply's inverse."""
        self._check_axis(laid, -2, self.n_streams, "laid", "(..., n_streams, L)")
        n_frames = self.frames(laid.shape[-1])
        frames, levels = self.slot_frames(n_frames), self.slot_levels(n_frames)
        frames, levels = frames.to(laid.device), levels.to(laid.device)
        codes = torch.empty((*laid.shape[:-2], self.n_levels, n_frames), dtype=laid.dtype,
                            device=laid.device)
        filled = frames >= 0  # every (level, frame) sits in exactly one filled slot
        codes[..., levels[filled], frames[filled]] = \
            laid[..., filled] - levels[filled] * self._level_stride
        return codes

    @staticmethod
    def _check_axis(x: Tensor, axis: int, size: int, name: str, shape: str) -> None:
        if x.dim() < 2 or x.shape[axis] != size:
            raise ValueError(f"{name} must have shape {shape} with {size} on dim {axis}, "
                             f"got {tuple(x.shape)}")


def stream_pattern(kind: str, n_levels: int, codebook_size: int) -> CodebookPattern:
    """The pattern `kind` ("flatten", "delay" or "parallel") for K levels of codebook_size."""
    return CodebookPattern(kind, n_levels, codebook_size)
