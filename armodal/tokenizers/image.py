"""Image tokenizers: raster-order pixels (grey levels, RGB sub-pixels or a k-means palette) and
VQ patch codes from a trained codec, both laid out on one `GridLayout`.

An image is a uint8 tensor (C, H, W). A tokenizer turns it into a grid of codes (h, w, c)
(c tokens per cell: 3 for RGB sub-pixels, else 1) and the layout writes the grid in raster
order, optionally with the size up front and an end-of-row token after each row. Codes always
take the first local ids [0, n_codes), so "a code" is one contiguous id range and bits per
dimension count exactly those targets (see `dims_per_code`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor

__all__ = ["GridLayout", "PixelTokenizer", "VQTokenizer", "image_shape"]


def _target(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def image_shape(size: int | Iterable[int]) -> tuple[int, int]:
    """An int side or an (H, W) pair -> (H, W) of positive ints."""
    hw = (size, size) if isinstance(size, int) else tuple(int(s) for s in size)
    if len(hw) != 2 or min(hw) < 1:
        raise ValueError(f"image_size must be a positive int or an (H, W) pair, got {size!r}")
    return hw


@dataclass(frozen=True)
class GridLayout:
    """How a (height, width, per_cell) grid of codes becomes a 1-D stream of local ids.

    Local ids: codes [0, n_codes), then <eor> (end of row) when row_end, then one id per
    side length 1..max(height, width) when size_tokens (the stream then starts [H, W]).
    """

    height: int
    width: int
    per_cell: int
    n_codes: int
    row_end: bool = False
    size_tokens: bool = False

    @property
    def eor_id(self) -> int:
        if not self.row_end:
            raise ValueError("this layout has no end-of-row token (row_end=False)")
        return self.n_codes

    @property
    def vocab_size(self) -> int:
        sides = max(self.height, self.width) if self.size_tokens else 0
        return self.n_codes + self.row_end + sides

    def size_id(self, side: int) -> int:
        return self.n_codes + self.row_end + side - 1

    def steps(self) -> list[int | None]:
        """Per stream position: None where any code may stand, else the forced local id."""
        row = [None] * (self.width * self.per_cell) + ([self.eor_id] if self.row_end else [])
        head = [self.size_id(self.height), self.size_id(self.width)] if self.size_tokens else []
        return head + row * self.height

    def prefix_length(self, rows: int) -> int:
        """Stream positions up to and including the first `rows` grid rows."""
        return 2 * self.size_tokens + rows * (self.width * self.per_cell + self.row_end)

    @property
    def length(self) -> int:
        return self.prefix_length(self.height)

    def to_stream(self, grid: Tensor) -> Tensor:
        """(..., height, width, per_cell) int64 codes -> (..., length) local ids."""
        lead = grid.shape[:-3]
        rows = grid.reshape(*lead, self.height, self.width * self.per_cell)
        if self.row_end:
            rows = torch.cat([rows, rows.new_full((*lead, self.height, 1), self.eor_id)], -1)
        stream = rows.reshape(*lead, -1)
        if self.size_tokens:
            head = torch.tensor([self.size_id(self.height), self.size_id(self.width)])
            stream = torch.cat([head.expand(*lead, 2), stream], -1)
        return stream

    def from_stream(self, ids: Tensor, who: str) -> Tensor:
        """Inverse of `to_stream`; ValueError naming the first position that breaks the layout."""
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if len(ids) != self.length:
            raise ValueError(f"{who}.decode expects {self.length} ids for a {self.height}x"
                             f"{self.width} image, got {len(ids)}")
        steps = self.steps()
        is_code = torch.tensor([s is None for s in steps])
        forced = torch.tensor([-1 if s is None else s for s in steps])
        bad = torch.where(is_code, (ids < 0) | (ids >= self.n_codes), ids != forced)
        if bad.any():
            pos = int(bad.nonzero()[0])
            want = f"a code in [0, {self.n_codes})" if steps[pos] is None else f"id {steps[pos]}"
            raise ValueError(f"{who}.decode: id {int(ids[pos])} at position {pos} breaks the "
                             f"image layout, which needs {want} there")
        return ids[is_code].reshape(self.height, self.width, self.per_cell)


def _check_batch(images: Any, channels: int, hw: tuple[int, int], who: str) -> Tensor:
    """images as (N, C, H, W) uint8 of the tokenizer's shape; a single (C, H, W) gets N = 1."""
    from armodal.data.images import check_images

    check_images(images, channels, hw, who)
    return images[None] if images.dim() == 3 else images


class PixelTokenizer:
    """Pixels in raster order.

    color="gray": one token per pixel, intensity quantized uniformly to `levels`
        (q = round(x * (levels - 1) / 255): exact and lossless at 256 levels, and exact for
        data with `levels` evenly spaced values, such as the 17 of sklearn's digits).
    color="channels": R, G, B sub-pixels as three tokens per pixel, each quantized as above.
    color="palette": one token per pixel, its nearest colour in a k-means palette of
        `n_colors` fitted on the training images (Image GPT); lossy.
    """

    modality = "image"
    unit = "dim"

    def __init__(self, image_size: int | list[int] = 8, channels: int = 1, levels: int = 256,
                 color: str = "gray", n_colors: int = 16, row_end: bool = False,
                 size_tokens: bool = False, seed: int = 0) -> None:
        if color not in ("gray", "channels", "palette"):
            raise ValueError(f"color must be 'gray', 'channels' or 'palette', got {color!r}")
        if channels not in (1, 3) or (color == "gray") != (channels == 1):
            raise ValueError(f"color={color!r} with channels={channels}: gray images have 1 "
                             f"channel, 'channels' and 'palette' images have 3")
        if not 2 <= levels <= 256:
            raise ValueError(f"levels must be in [2, 256], got {levels}")
        if color == "palette" and not 2 <= n_colors <= 4096:
            raise ValueError(f"n_colors must be in [2, 4096], got {n_colors}")
        self.image_size = image_shape(image_size)
        self.channels, self.levels, self.color = channels, levels, color
        self.n_colors, self.seed = n_colors, seed
        self._init = {"image_size": list(self.image_size), "channels": channels, "levels": levels,
                      "color": color, "n_colors": n_colors, "row_end": row_end,
                      "size_tokens": size_tokens, "seed": seed}
        n_codes = n_colors if color == "palette" else levels
        self.layout = GridLayout(*self.image_size, 3 if color == "channels" else 1, n_codes,
                                 row_end, size_tokens)
        self.vocab_size = self.layout.vocab_size
        self.lossless = color != "palette" and levels == 256
        self.palette: Tensor | None = None  # (n_colors, 3) uint8 once fitted

    @property
    def is_fitted(self) -> bool:
        return self.color != "palette" or self.palette is not None

    @property
    def dims_per_code(self) -> int:
        """Image dimensions (sub-pixel values) one code token stands for."""
        return 3 if self.color == "palette" else 1

    def fit(self, images: Iterable[Tensor] | Tensor) -> None:
        """Fit the palette (color="palette") with k-means on the training images' pixels."""
        if self.color != "palette":
            return
        from sklearn.cluster import KMeans

        pixels = torch.stack(list(images)) if not isinstance(images, Tensor) else images
        pixels = pixels.permute(0, 2, 3, 1).reshape(-1, 3).float().numpy()  # (N*H*W, 3)
        rng = np.random.default_rng(self.seed)
        if len(pixels) > 100_000:  # a sample fits the palette as well, in a fraction of the time
            pixels = pixels[rng.choice(len(pixels), 100_000, replace=False)]
        if len(np.unique(pixels, axis=0)) < self.n_colors:
            raise ValueError(f"the training images have fewer distinct colours than "
                             f"n_colors={self.n_colors}; lower n_colors")
        km = KMeans(self.n_colors, n_init=1, random_state=self.seed).fit(pixels)
        self.palette = torch.from_numpy(km.cluster_centers_).round().clamp(0, 255).to(torch.uint8)

    def _fitted_palette(self) -> Tensor:
        if self.palette is None:
            raise ValueError("PixelTokenizer(color='palette') is not fitted; call fit()")
        return self.palette

    def grid(self, images: Tensor) -> Tensor:
        """(N, C, H, W) uint8 -> (N, H, W, per_cell) int64 codes."""
        if self.color == "palette":
            pixels = images.permute(0, 2, 3, 1).float()  # (N, H, W, 3)
            dist = torch.cdist(pixels.reshape(len(images), -1, 3), self._fitted_palette().float())
            return dist.argmin(-1).reshape(*pixels.shape[:3], 1)
        q = (images.float() * (self.levels - 1) / 255).round().long()  # (N, C, H, W)
        return q.permute(0, 2, 3, 1)

    def encode(self, sample: Tensor) -> Tensor:
        """(C, H, W) uint8 image -> (length,) local ids."""
        return self.encode_batch(sample)[0]

    def encode_batch(self, images: Tensor) -> Tensor:
        """(N, C, H, W) uint8 -> (N, length) local ids."""
        images = _check_batch(images, self.channels, self.image_size, "PixelTokenizer.encode")
        return self.layout.to_stream(self.grid(images))

    def decode(self, ids: Tensor) -> Tensor:
        """(length,) local ids -> (C, H, W) uint8 image."""
        grid = self.layout.from_stream(ids, "PixelTokenizer")  # (H, W, per_cell)
        if self.color == "palette":
            return self._fitted_palette()[grid[..., 0]].permute(2, 0, 1).contiguous()
        values = (grid.float() * 255 / (self.levels - 1)).round().to(torch.uint8)
        return values.permute(2, 0, 1).contiguous()

    def count_units(self, sample: Tensor) -> int:
        """Dimensions of the image: C * H * W."""
        return int(sample.numel())

    def state_dict(self) -> dict:
        return {} if self.palette is None else {"palette": self.palette.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if "palette" in state:
            palette = torch.tensor(state["palette"], dtype=torch.uint8)
            if tuple(palette.shape) != (self.n_colors, 3):
                raise ValueError(f"palette has shape {tuple(palette.shape)}, expected "
                                 f"({self.n_colors}, 3)")
            self.palette = palette

    def config(self) -> dict:
        return {"target": _target(self), "init": dict(self._init), "state": self.state_dict()}


class VQTokenizer:
    """Patch codes from a trained, frozen VQ codec (`armodal train image_vq_tokenizer`).

    `codec` is the codec directory the tokenizer recipe wrote. Its weights' sha256 is kept in
    the tokenizer state, so a language model never silently decodes with another codec.
    """

    modality = "image"
    unit = "dim"
    lossless = False

    def __init__(self, codec: str, row_end: bool = False, size_tokens: bool = False) -> None:
        from armodal.codecs.artefact import KIND, load_codec

        self.path = Path(codec).expanduser()
        self.model, self.meta = load_codec(self.path, kind=KIND)
        self.channels = int(self.meta["channels"])
        self.image_size = image_shape(self.meta["image_size"])
        h, w = self.model.grid(*self.image_size)
        self._init = {"codec": str(codec), "row_end": row_end, "size_tokens": size_tokens}
        self.layout = GridLayout(h, w, 1, self.model.codebook_size, row_end, size_tokens)
        self.vocab_size = self.layout.vocab_size
        self.dims_per_code = self.channels * self.image_size[0] * self.image_size[1] // (h * w)
        self.is_fitted = True
        self.codec_sha256 = self.meta["weights_sha256"]

    def fit(self, images: Any) -> None:
        """Nothing to fit: the codec was trained by its own recipe."""

    def encode(self, sample: Tensor) -> Tensor:
        """(C, H, W) uint8 image -> (length,) local ids."""
        return self.encode_batch(sample)[0]

    @torch.inference_mode()
    def encode_batch(self, images: Tensor, batch_size: int = 256) -> Tensor:
        """(N, C, H, W) uint8 -> (N, length) local ids."""
        images = _check_batch(images, self.channels, self.image_size, "VQTokenizer.encode")
        codes = torch.cat([self.model.encode(b) for b in images.split(batch_size)])  # (N, h, w)
        return self.layout.to_stream(codes[..., None])

    @torch.inference_mode()
    def decode(self, ids: Tensor) -> Tensor:
        """(length,) local ids -> (C, H, W) uint8 reconstruction."""
        grid = self.layout.from_stream(ids, "VQTokenizer")[..., 0]  # (h, w)
        return self.model.decode(grid[None])[0]

    def count_units(self, sample: Tensor) -> int:
        return int(sample.numel())

    def state_dict(self) -> dict:
        return {"codec_sha256": self.codec_sha256}

    def load_state_dict(self, state: dict) -> None:
        from armodal.codecs.artefact import check_codec_state

        check_codec_state(self.path, self.codec_sha256, state)

    def config(self) -> dict:
        return {"target": _target(self), "init": dict(self._init), "state": self.state_dict()}
