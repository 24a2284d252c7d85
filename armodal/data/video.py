"""Video clips as data: a synthetic moving-digits source built from any image source.

A clip is a `torch.uint8` tensor (F, C, H, W): F frames of one image each. `MovingDigits`
pastes one or two small digits into an empty canvas and moves each with a constant, seeded
velocity, bouncing off the walls (Moving MNIST, Srivastava et al. 2015). Every clip depends
only on (seed, which split, index) and on the images it is given, so a clip can be rebuilt
anywhere, and the train / val split is made on the source images before any clip is drawn:
no held-out digit is ever seen moving in training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from armodal.data.images import ImageSet, ImageSource, _conform
from armodal.data.sources import fingerprint_files

__all__ = ["ClipSet", "MovingDigits"]

SALTS = {"train": 0, "val": 1}  # one random stream per split, so val motions are not train's


@dataclass
class ClipSet:
    """Clips (N, F, C, H, W) uint8, each digit's top-left corner per frame (N, F, D, 2) as
    (row, col), and the index of the source image of each digit (N, D)."""

    frames: Tensor
    positions: Tensor
    sources: Tensor
    name: str

    def __post_init__(self) -> None:
        n, f = self.frames.shape[:2]
        if self.frames.dtype != torch.uint8 or self.frames.dim() != 5:
            raise ValueError(f"ClipSet {self.name!r}: frames must be uint8 (N, F, C, H, W), got "
                             f"{self.frames.dtype} {tuple(self.frames.shape)}")
        if self.positions.shape[:2] != (n, f) or self.sources.shape[0] != n:
            raise ValueError(f"ClipSet {self.name!r}: positions {tuple(self.positions.shape)} "
                             f"and sources {tuple(self.sources.shape)} do not match {n} clips "
                             f"of {f} frames")

    def __len__(self) -> int:
        return len(self.frames)

    def subset(self, index: Tensor | slice) -> ClipSet:
        """The selected clips, same name."""
        return ClipSet(self.frames[index], self.positions[index], self.sources[index],
                       self.name)


class MovingDigits:
    """Clips of `digits` digits from `images`, each scaled to `digit_size` and moving in a
    `canvas` x `canvas` frame at a seeded constant speed, bouncing off the walls.

    Args:
        images: any image source (MNISTImages, DigitsImages, ...); grey, resized here.
        frames: frames per clip.
        canvas: side of each (square) frame in pixels.
        digit_size: side each digit is scaled to; must leave room to move (< canvas).
        digits: 1 or 2 per clip; overlapping digits combine by their brighter pixel.
        speed: (low, high) pixels per frame, drawn uniformly; the direction is uniform.
        clips_per_image: clips drawn per source image of a split (clip i starts from image
            i mod n, so the first n clips show every image once).
        seed: the clips' random stream; clip i of a split depends only on (seed, split, i).
    """

    def __init__(self, images: ImageSource, frames: int = 8, canvas: int = 28,
                 digit_size: int = 14, digits: int = 1, speed: Sequence[float] = (1.0, 3.0),
                 clips_per_image: int = 1, seed: int = 0) -> None:
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"MovingDigits: frames must be an integer >= 2, got {frames!r}")
        if not isinstance(digit_size, int) or not isinstance(canvas, int) \
                or not 1 <= digit_size < canvas:
            raise ValueError(f"MovingDigits: digit_size={digit_size!r}, canvas={canvas!r}: need "
                             f"integers with 1 <= digit_size < canvas (room to move)")
        if digits not in (1, 2):
            raise ValueError(f"MovingDigits: digits must be 1 or 2, got {digits!r}")
        low, high = (float(s) for s in speed)
        room = canvas - digit_size
        if not 0 <= low <= high <= room:
            raise ValueError(f"MovingDigits: speed={list(speed)!r}: need 0 <= low <= high <= "
                             f"{room} (canvas - digit_size) pixels per frame")
        if not isinstance(clips_per_image, int) or clips_per_image < 1:
            raise ValueError(f"MovingDigits: clips_per_image must be an integer >= 1, got "
                             f"{clips_per_image!r}")
        self.images, self.frames, self.canvas, self.digit_size = images, frames, canvas, digit_size
        self.digits, self.speed, self.clips_per_image = digits, (low, high), clips_per_image
        self.seed = seed

    def load_images(self) -> ImageSet:
        """The source's images as grey digit_size x digit_size digits, with their labels."""
        data = self.images.load()
        digits = _conform(data.images, self.digit_size, 1)  # (N, 1, d, d)
        return ImageSet(digits, data.labels, data.classes, data.name)

    def clips(self, images: ImageSet, split: str = "train") -> ClipSet:
        """Every clip of a split: clips_per_image * len(images) of them, (N, F, 1, H, W)."""
        if split not in SALTS:
            raise ValueError(f"MovingDigits.clips: split must be one of {list(SALTS)}, got "
                             f"{split!r}")
        n = len(images) * self.clips_per_image
        made = [self.clip(images, i, split) for i in range(n)]
        frames, positions, sources = (torch.stack(parts) for parts in zip(*made))
        name = f"moving digits ({split}, {n} clips of {self.frames} frames) from {images.name}"
        return ClipSet(frames, positions, sources, name)

    def clip(self, images: ImageSet, index: int,
             split: str = "train") -> tuple[Tensor, Tensor, Tensor]:
        """Clip `index` of a split: frames (F, 1, H, W) uint8, positions (F, D, 2) int64 and
        sources (D,) int64. Only (seed, split, index) and `images` decide it."""
        rng = np.random.default_rng([self.seed, SALTS[split], index])
        first = index % len(images)
        sources = [first] + [int(rng.integers(len(images))) for _ in range(self.digits - 1)]
        frames = torch.zeros(self.frames, 1, self.canvas, self.canvas, dtype=torch.uint8)
        positions = torch.stack([self._path(rng) for _ in sources], 1)  # (F, D, 2)
        d = self.digit_size
        for k, src in enumerate(sources):
            digit = images.images[src]  # (1, d, d)
            for t, (row, col) in enumerate(positions[:, k].tolist()):
                window = frames[t, :, row:row + d, col:col + d]
                torch.maximum(window, digit, out=window)
        return frames, positions, torch.tensor(sources)

    def _path(self, rng: np.random.Generator) -> Tensor:
        """(F, 2) int64 top-left corners of one digit: a straight line at constant velocity,
        folded back into [0, room] at each wall (a bounce is a reflection of the line)."""
        room = self.canvas - self.digit_size
        start = rng.uniform(0, room, size=2)
        angle, speed = rng.uniform(0, 2 * math.pi), rng.uniform(*self.speed)
        velocity = speed * np.array([math.sin(angle), math.cos(angle)])
        free = start + velocity * np.arange(self.frames)[:, None]  # (F, 2) unbounded line
        folded = room - np.abs(room - np.mod(free, 2 * room))  # triangle wave in [0, room]
        return torch.from_numpy(np.rint(folded).astype(np.int64))

    def fingerprint(self) -> str:
        """The settings and the image source's own fingerprint."""
        settings = {"class": "MovingDigits", "images": self.images.fingerprint(),
                    "frames": self.frames, "canvas": self.canvas, "digit_size": self.digit_size,
                    "digits": self.digits, "speed": list(self.speed),
                    "clips_per_image": self.clips_per_image, "seed": self.seed}
        return fingerprint_files([], settings)

    def __repr__(self) -> str:
        return (f"MovingDigits({self.images!r}, frames={self.frames}, canvas={self.canvas}, "
                f"digit_size={self.digit_size}, digits={self.digits})")
