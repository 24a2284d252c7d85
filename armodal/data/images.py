"""Raw image sources: where images come from before an image tokenizer sees them.

Everywhere in armodal an image is a `torch.uint8` tensor (C, H, W), C in {1, 3}, values 0..255;
a source's `load()` returns them stacked as an `ImageSet` (N, C, H, W) with optional labels.

Sources list and read files lazily (at `load()` / `fingerprint()` time, not at construction) so
that Hydra configs naming data that is not on this machine still compose and instantiate.
Every source takes `size` (resize to size x size: antialiased resize of the shorter side, then a
centre crop when the aspect ratio differs) and `channels` (3 -> 1 luma, 1 -> 3 repeat).
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import sklearn
import torch
from PIL import Image
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes
from torchvision.transforms.v2 import functional as TF

from armodal.data.sources import fingerprint_files
from armodal.data.splits import split_indices

__all__ = [
    "DigitsImages",
    "ImageFolderImages",
    "ImageSet",
    "ImageSource",
    "MNISTImages",
    "PhotoCrops",
    "check_images",
    "read_idx",
    "split_images",
]


@dataclass
class ImageSet:
    """Images (N, C, H, W) uint8 with optional int64 class labels (N,) indexing `classes`."""

    images: Tensor
    labels: Tensor | None
    classes: list[str] | None
    name: str

    def __post_init__(self) -> None:
        check_images(self.images, channels=None, size=None, where=f"ImageSet {self.name!r}")
        if self.images.dim() != 4:
            raise ValueError(f"ImageSet {self.name!r}: images must be (N, C, H, W), "
                             f"got shape {tuple(self.images.shape)}")
        if self.labels is not None:
            if self.classes is None:
                raise ValueError(f"ImageSet {self.name!r}: labels given without class names")
            if self.labels.shape != (len(self.images),) or self.labels.dtype != torch.int64:
                raise ValueError(
                    f"ImageSet {self.name!r}: labels must be int64 of shape ({len(self.images)},)"
                    f", got {self.labels.dtype} {tuple(self.labels.shape)}"
                )

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: Tensor) -> ImageSet:
        """The selected rows (int indices or a bool mask), same classes and name."""
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.classes, self.name)


@runtime_checkable
class ImageSource(Protocol):
    """Anything that loads an ImageSet and gives a cheap identity for cache keys."""

    def load(self) -> ImageSet:
        """Read (and resize / convert) every image."""
        ...

    def fingerprint(self) -> str:
        """A hex digest that changes when the images or the settings change."""
        ...


def check_images(
    images: Tensor, channels: int | None, size: tuple[int, int] | None, where: str
) -> None:
    """Raise ValueError (naming `where`) unless `images` is uint8 (C, H, W) or (N, C, H, W).

    `channels` / `size` = (H, W) pin the channel count / spatial size; None allows any
    (channels then still has to be 1 or 3).
    """
    if not isinstance(images, Tensor):
        raise TypeError(f"{where}: expected a torch.uint8 tensor, got {type(images).__name__}")
    shape = tuple(images.shape)
    allowed_c = (1, 3) if channels is None else (channels,)
    want = f"uint8 (C, H, W) or (N, C, H, W) with C in {allowed_c}"
    if size is not None:
        want += f" and H, W = {tuple(size)}"
    if images.dtype != torch.uint8 or images.dim() not in (3, 4):
        raise ValueError(f"{where}: got {images.dtype} of shape {shape}; allowed: {want}")
    if shape[-3] not in allowed_c or (size is not None and shape[-2:] != tuple(size)):
        raise ValueError(f"{where}: got shape {shape}; allowed: {want}")


def _check_settings(size: int | None, channels: int | None, who: str) -> None:
    if size is not None and (not isinstance(size, int) or size < 1):
        raise ValueError(f"{who}: size must be a positive int or None, got {size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"{who}: channels must be 1, 3 or None, got {channels!r}")


def _conform(images: Tensor, size: int | None, channels: int | None) -> Tensor:
    """Resize (..., C, H, W) to size x size and convert to `channels`; None keeps as is."""
    if size is not None and tuple(images.shape[-2:]) != (size, size):
        # Shorter side to `size`, then centre crop: keeps the aspect ratio, never pads.
        images = TF.resize(images, [size], antialias=True)
        images = TF.center_crop(images, [size, size])
    if channels == 1 and images.shape[-3] == 3:
        images = TF.rgb_to_grayscale(images, num_output_channels=1)
    elif channels == 3 and images.shape[-3] == 1:
        images = images.repeat_interleave(3, dim=-3)
    return images


def _describe(base: str, size: int | None, channels: int | None) -> str:
    extra = ([f"{size}x{size}"] if size else []) + ([f"{channels}ch"] if channels else [])
    return f"{base} -> {' '.join(extra)}" if extra else base


class DigitsImages:
    """scikit-learn's bundled 1797 8x8 handwritten digits (offline everywhere), labels 0..9.

    Pixel levels 0..16 become round(v * 255 / 16), so q = round(x * 16 / 255) gives v back.
    """

    def __init__(self, size: int | None = None, channels: int | None = None) -> None:
        _check_settings(size, channels, "DigitsImages")
        self.size, self.channels = size, channels

    def load(self) -> ImageSet:
        """All 1797 digits, (1797, 1, 8, 8) unless resized / converted."""
        from sklearn.datasets import load_digits

        digits = load_digits()
        levels = np.rint(digits.images * 255 / 16).astype(np.uint8)  # (N, 8, 8)
        images = _conform(torch.from_numpy(levels)[:, None], self.size, self.channels)
        labels = torch.from_numpy(digits.target).long()
        name = _describe("sklearn digits 8x8", self.size, self.channels)
        return ImageSet(images, labels, [str(d) for d in range(10)], name)

    def fingerprint(self) -> str:
        """The settings and the scikit-learn version that bundles the data."""
        settings = {"class": "DigitsImages", "size": self.size, "channels": self.channels,
                    "sklearn": sklearn.__version__}
        return fingerprint_files([], settings)

    def __repr__(self) -> str:
        return f"DigitsImages(size={self.size}, channels={self.channels})"


_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an unsigned-byte IDX file (the MNIST format), plain or gzip, into a uint8 array.

    Header: two zero bytes, dtype code 0x08, ndim, then ndim big-endian uint32 dims. Raises
    ValueError naming the file when the magic or dtype is wrong or the dims do not match the
    data length (a truncated or mislabelled download).
    """
    path = Path(path)
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic: sniff rather than trust the extension
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"IDX file {path}: corrupt gzip data ({e})") from e
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise ValueError(f"IDX file {path}: bad magic {raw[:4].hex()!r}; expected 0000 08 <ndim>")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(f"IDX file {path}: dtype code 0x{raw[2]:02x} is not supported; "
                         f"only 0x{_IDX_UBYTE:02x} (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(raw) < header:
        raise ValueError(f"IDX file {path}: header claims ndim={ndim} (allowed >= 1) in a "
                         f"file of {len(raw)} bytes")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise ValueError(f"IDX file {path}: header dims {dims} need {int(np.prod(dims))} data "
                         f"bytes but the file holds {len(raw) - header}")
    # Copy: frombuffer over bytes is read-only, and torch warns on non-writable arrays.
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


class MNISTImages:
    """MNIST from its IDX files (plain or .gz), labels 0..9.

    `root` holds the files directly or is a torchvision `datasets.MNIST` root (`MNIST/raw/`).
    `split` is "train", "test" or "auto" (train when its files are there, else test).
    `limit` keeps the first N images.
    """

    def __init__(
        self,
        root: str,
        split: str = "auto",
        size: int | None = None,
        channels: int | None = None,
        limit: int | None = None,
    ) -> None:
        if split not in ("train", "test", "auto"):
            raise ValueError(f"MNISTImages: split must be 'train', 'test' or 'auto', got {split!r}")
        if limit is not None and limit < 1:
            raise ValueError(f"MNISTImages: limit must be >= 1 or None, got {limit}")
        _check_settings(size, channels, "MNISTImages")
        self.root, self.split, self.size, self.channels, self.limit = (
            root, split, size, channels, limit)

    def _find(self, name: str) -> Path | None:
        root = Path(os.path.expanduser(self.root))
        for folder in (root, root / "MNIST" / "raw"):
            for candidate in (folder / name, folder / f"{name}.gz"):
                if candidate.is_file():
                    return candidate
        return None

    def _files(self) -> tuple[str, Path, Path]:
        root = os.path.expanduser(self.root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"MNISTImages root {root!r} is not a folder")
        splits = ["train", "test"] if self.split == "auto" else [self.split]
        for split in splits:
            images, labels = (self._find(n) for n in _MNIST_FILES[split])
            if images is not None and labels is not None:
                return split, images, labels
        wanted = [f"{n}[.gz]" for s in splits for n in _MNIST_FILES[s]]
        raise FileNotFoundError(
            f"MNISTImages: no complete split {splits} under {root!r} or "
            f"{os.path.join(root, 'MNIST', 'raw')!r}; looked for {wanted}"
        )

    def load(self) -> ImageSet:
        """The split's images (N, 1, 28, 28) unless resized / converted, with labels."""
        split, image_file, label_file = self._files()
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or labels.ndim != 1:
            raise ValueError(f"MNISTImages: expected (N, H, W) images in {image_file} and (N,) "
                             f"labels in {label_file}, got {images.shape} and {labels.shape}")
        if len(images) != len(labels):
            raise ValueError(f"MNISTImages: {image_file} holds {len(images)} images but "
                             f"{label_file} holds {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"MNISTImages: {label_file} has label {labels.max()}; allowed 0..9")
        images, labels = images[: self.limit], labels[: self.limit]
        x = _conform(torch.from_numpy(images)[:, None], self.size, self.channels)
        name = _describe(f"MNIST {split} ({len(x)})", self.size, self.channels)
        labels_t = torch.from_numpy(labels.astype(np.int64))
        return ImageSet(x, labels_t, [str(d) for d in range(10)], name)

    def fingerprint(self) -> str:
        """The settings and the chosen files' names, sizes and mtimes."""
        split, image_file, label_file = self._files()
        entries = [(f, f.name, f.stat().st_size) for f in (image_file, label_file)]
        settings = {"class": "MNISTImages", "root": os.path.abspath(image_file.parent),
                    "split": split, "size": self.size, "channels": self.channels,
                    "limit": self.limit}
        return fingerprint_files(entries, settings)

    def __repr__(self) -> str:
        return f"MNISTImages(root={self.root!r}, split={self.split!r}, size={self.size})"


class ImageFolderImages:
    """Any torchvision ImageFolder layout (root/<class>/<image>), class names from the folders.

    `size` may be None only when every image already has the same size. Every non-hidden file
    below a class folder must be a readable image: other files raise rather than being skipped,
    so a dataset is never silently smaller than it looks. Files directly in `root` are ignored,
    as in torchvision. RGBA / palette images become RGB (alpha dropped). `channels=None` gives
    1 channel when every file is grayscale, else 3.
    """

    def __init__(self, root: str, size: int | None, channels: int | None = 3) -> None:
        _check_settings(size, channels, "ImageFolderImages")
        self.root, self.size, self.channels = root, size, channels

    def _files(self) -> tuple[list[str], list[tuple[Path, int]]]:
        root = os.path.expanduser(self.root)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"ImageFolderImages root {root!r} is not a folder")
        try:
            classes, _ = find_classes(root)
        except FileNotFoundError as e:
            raise ValueError(f"ImageFolderImages: no class folders under {root!r}; expected "
                             f"root/<class>/<image>") from e
        files = []
        for label, name in enumerate(classes):
            found = []
            for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
                dirnames.sort()
                # Hidden files (.DS_Store, editor swap files) are not data.
                found += [Path(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
            for f in found:
                if not f.name.lower().endswith(IMG_EXTENSIONS):
                    raise ValueError(f"ImageFolderImages: {f} is not an image file; "
                                     f"allowed extensions: {', '.join(IMG_EXTENSIONS)}")
            if not found:
                raise ValueError(f"ImageFolderImages: class folder {os.path.join(root, name)!r} "
                                 f"holds no images")
            files += [(f, label) for f in found]
        return classes, files

    def load(self) -> ImageSet:
        """Every image, resized to `size` and converted to `channels`, labelled by folder."""
        classes, files = self._files()
        images = [_open_image(f) for f, _ in files]
        if self.size is None:
            first = images[0].shape[-2:]
            for (f, _), x in zip(files, images):
                if x.shape[-2:] != first:
                    raise ValueError(
                        f"ImageFolderImages: images differ in size ({files[0][0]} is "
                        f"{tuple(first)}, {f} is {tuple(x.shape[-2:])}); pass size= to resize")
        channels = self.channels or max(x.shape[0] for x in images)
        stacked = torch.stack([_conform(x, self.size, channels) for x in images])
        labels = torch.tensor([label for _, label in files], dtype=torch.int64)
        name = _describe(f"image folder {os.path.basename(os.path.normpath(self.root))}",
                         self.size, self.channels)
        return ImageSet(stacked, labels, classes, name)

    def fingerprint(self) -> str:
        """The settings and every file's relative name, size and mtime."""
        root = Path(os.path.expanduser(self.root))
        entries = [(f, f.relative_to(root).as_posix(), f.stat().st_size)
                   for f, _ in self._files()[1]]
        settings = {"class": "ImageFolderImages", "root": os.path.abspath(root),
                    "size": self.size, "channels": self.channels}
        return fingerprint_files(entries, settings)

    def __repr__(self) -> str:
        return f"ImageFolderImages(root={self.root!r}, size={self.size})"


def _open_image(path: Path) -> Tensor:
    """(C, H, W) uint8: 1 channel for grayscale files, else RGB."""
    try:
        with Image.open(path) as im:
            im = im.convert("L" if im.mode in ("1", "L") else "RGB")
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unreadable files
        raise ValueError(f"ImageFolderImages: cannot read {path} as an image ({e}); "
                         f"allowed: readable {', '.join(IMG_EXTENSIONS)} files") from e
    return TF.pil_to_tensor(im)


class PhotoCrops:
    """Seeded random square crops of scikit-learn's two bundled photos, unlabelled.

    Each crop picks a photo, a side in [size, 4 * size] (capped by the photo) and a position,
    then is resized to size x size: varied natural-image patches for VQ tokenizer training.
    """

    def __init__(
        self, n: int = 2000, size: int = 32, channels: int | None = 3, seed: int = 0
    ) -> None:
        if n < 1:
            raise ValueError(f"PhotoCrops: n must be >= 1, got {n}")
        _check_settings(size, channels, "PhotoCrops")
        if size is None or size > 427:
            raise ValueError(f"PhotoCrops: size must be in 1..427 (the photos are 427x640), "
                             f"got {size}")
        self.n, self.size, self.channels, self.seed = n, size, channels, seed

    def load(self) -> ImageSet:
        """n crops, (n, channels, size, size)."""
        from sklearn.datasets import load_sample_images

        photos = [torch.tensor(p).permute(2, 0, 1) for p in load_sample_images().images]
        rng = np.random.default_rng(self.seed)
        crops = []
        for _ in range(self.n):
            photo = photos[rng.integers(len(photos))]  # (3, H, W)
            h, w = photo.shape[-2:]
            side = int(rng.integers(self.size, min(4 * self.size, h, w) + 1))
            top, left = int(rng.integers(h - side + 1)), int(rng.integers(w - side + 1))
            crop = photo[:, top : top + side, left : left + side]
            crops.append(_conform(crop, self.size, self.channels))
        name = _describe(f"sklearn photo crops ({self.n}, seed {self.seed})", self.size,
                         self.channels)
        return ImageSet(torch.stack(crops), None, None, name)

    def fingerprint(self) -> str:
        """The settings and the scikit-learn version that bundles the photos."""
        settings = {"class": "PhotoCrops", "n": self.n, "size": self.size,
                    "channels": self.channels, "seed": self.seed, "sklearn": sklearn.__version__}
        return fingerprint_files([], settings)

    def __repr__(self) -> str:
        return f"PhotoCrops(n={self.n}, size={self.size}, seed={self.seed})"


def split_images(
    data: ImageSet, val_fraction: float, method: str = "random", seed: int = 0
) -> tuple[ImageSet, ImageSet]:
    """(train, val) images, each in original order (armodal.data.splits.split_indices)."""
    train, val = split_indices(len(data), val_fraction, method, seed, "split_images (images)")
    return data.subset(train), data.subset(val)
