"""Raw image sources: digits, IDX/MNIST, image folders, photo crops, splits and checks."""

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from armodal.data.images import (
    DigitsImages,
    ImageFolderImages,
    ImageSet,
    ImageSource,
    MNISTImages,
    PhotoCrops,
    check_images,
    read_idx,
    split_images,
)

REAL_MNIST = Path("/work/shared/data/mnist")


def _write_idx(path: Path, arr: np.ndarray, dims=None, magic=b"\0\0\x08") -> Path:
    """An IDX file for `arr`; `dims` overrides the header to fake a corrupt file."""
    dims = arr.shape if dims is None else dims
    data = magic + bytes([len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def _mnist_root(folder: Path, counts: dict, gz: bool) -> dict:
    """Synthetic MNIST files for each split in `counts`; returns split -> (images, labels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(counts))
    out = {}
    for split, n in counts.items():
        prefix = "train" if split == "train" else "t10k"
        ext = ".gz" if gz else ""
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte{ext}", images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte{ext}", labels)
        out[split] = (images, labels)
    return out


def _indexed(n: int) -> ImageSet:
    """n 1x1 images whose only pixel is their index, so splits can be checked by value."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1)
    return ImageSet(images, torch.arange(n) % 2, ["even", "odd"], "indexed")


# ---------------------------------------------------------------- digits


def test_digits_shape_labels_and_exact_17_level_recovery():
    from sklearn.datasets import load_digits

    data = DigitsImages().load()
    assert isinstance(DigitsImages(), ImageSource)
    assert data.images.shape == (1797, 1, 8, 8) and data.images.dtype == torch.uint8
    assert data.labels.dtype == torch.int64 and set(data.labels.tolist()) == set(range(10))
    assert data.classes == [str(d) for d in range(10)] and len(data) == 1797
    levels = {round(v * 255 / 16) for v in range(17)}
    assert set(data.images.unique().tolist()) == levels
    q = torch.round(data.images.double() * 16 / 255)
    assert torch.equal(q[:, 0], torch.from_numpy(load_digits().images))
    assert torch.equal(data.labels, torch.from_numpy(load_digits().target).long())


def test_digits_size_and_channels_conversion():
    base = DigitsImages().load().images
    rgb = DigitsImages(size=16, channels=3).load().images
    assert rgb.shape == (1797, 3, 16, 16) and rgb.dtype == torch.uint8
    assert torch.equal(rgb[:, 0], rgb[:, 1]) and torch.equal(rgb[:, 1], rgb[:, 2])
    assert torch.equal(DigitsImages(size=8, channels=1).load().images, base)
    # Antialiased downsampling of a 2x2 block average stays near the block mean.
    small = DigitsImages(size=4).load().images.float()
    block_mean = base.float().view(1797, 1, 4, 2, 4, 2).mean((3, 5))
    assert (small - block_mean).abs().mean() < 20


# ---------------------------------------------------------------- IDX / MNIST


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trips_plain_and_gzip(tmp_path, name):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    out = read_idx(_write_idx(tmp_path / name, arr))
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4) and np.array_equal(out, arr)
    out[0, 0, 0] = 7  # a writable array, safe for torch.from_numpy
    vec = np.array([5, 0, 9], dtype=np.uint8)
    assert np.array_equal(read_idx(_write_idx(tmp_path / f"v{name}", vec)), vec)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_header_length_mismatch_names_file(tmp_path, gz):
    arr = np.zeros((2, 3, 3), dtype=np.uint8)
    path = _write_idx(tmp_path / ("bad.idx" + (".gz" if gz else "")), arr, dims=(3, 3, 3))
    with pytest.raises(ValueError, match=r"bad\.idx.*\(3, 3, 3\).*27.*18"):
        read_idx(path)


def test_read_idx_bad_magic_and_dtype_name_file(tmp_path):
    arr = np.zeros(4, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"magic\.idx.*bad magic"):
        read_idx(_write_idx(tmp_path / "magic.idx", arr, magic=b"\x01\0\x08"))
    with pytest.raises(ValueError, match=r"float\.idx.*0x0d"):
        read_idx(_write_idx(tmp_path / "float.idx", arr, magic=b"\0\0\x0d"))
    (tmp_path / "short.idx").write_bytes(b"\0\0\x08\x03\0\0")
    with pytest.raises(ValueError, match=r"short\.idx"):
        read_idx(tmp_path / "short.idx")


def test_mnist_files_directly_in_root(tmp_path):
    truth = _mnist_root(tmp_path, {"train": 5, "test": 3}, gz=False)
    auto = MNISTImages(str(tmp_path)).load()  # auto prefers train
    assert auto.images.shape == (5, 1, 28, 28) and auto.images.dtype == torch.uint8
    assert np.array_equal(auto.images[:, 0].numpy(), truth["train"][0])
    assert auto.labels.tolist() == truth["train"][1].tolist() and auto.classes[9] == "9"
    test = MNISTImages(str(tmp_path), split="test", limit=2).load()
    assert np.array_equal(test.images[:, 0].numpy(), truth["test"][0][:2])
    assert test.labels.tolist() == truth["test"][1][:2].tolist()


def test_mnist_torchvision_layout_gz_and_conversion(tmp_path):
    truth = _mnist_root(tmp_path / "MNIST" / "raw", {"test": 4}, gz=True)
    data = MNISTImages(str(tmp_path)).load()  # auto falls back to test
    assert np.array_equal(data.images[:, 0].numpy(), truth["test"][0])
    conv = MNISTImages(str(tmp_path), size=14, channels=3).load()
    assert conv.images.shape == (4, 3, 14, 14)
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\]"):
        MNISTImages(str(tmp_path), split="train").load()


def test_mnist_errors_are_lazy_and_named(tmp_path):
    missing = MNISTImages(str(tmp_path / "nowhere"))  # constructing touches no files
    with pytest.raises(FileNotFoundError, match="nowhere"):
        missing.load()
    _mnist_root(tmp_path, {"test": 3}, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(2, dtype=np.uint8))
    with pytest.raises(ValueError, match=r"3 images.*2 labels"):
        MNISTImages(str(tmp_path)).load()
    with pytest.raises(ValueError, match="split"):
        MNISTImages(str(tmp_path), split="val")


@pytest.mark.skipif(not REAL_MNIST.is_dir(), reason="no MNIST test files on this machine")
def test_real_mnist_test_split_loads():
    data = MNISTImages(str(REAL_MNIST)).load()
    assert data.images.shape == (10_000, 1, 28, 28) and data.images.dtype == torch.uint8
    assert set(data.labels.tolist()) == set(range(10))
    train, val = split_images(data, 0.1, method="tail")
    assert (len(train), len(val)) == (9_000, 1_000)


# ---------------------------------------------------------------- image folders


def _png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _folder(root: Path) -> Path:
    _png(root / "cat" / "a.png", np.full((10, 12, 3), (255, 0, 0), dtype=np.uint8))
    _png(root / "cat" / "b.png", np.full((10, 12, 3), (0, 0, 255), dtype=np.uint8))
    _png(root / "dog" / "sub" / "c.png", np.full((20, 20), 100, dtype=np.uint8))  # grayscale
    return root


def test_image_folder_resizes_and_labels(tmp_path):
    data = ImageFolderImages(str(_folder(tmp_path)), size=8).load()
    assert data.images.shape == (3, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.classes == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1]
    # Solid colours survive resizing exactly; the grayscale file is repeated to RGB.
    assert data.images[0, :, 3, 3].tolist() == [255, 0, 0]
    assert data.images[1, :, 3, 3].tolist() == [0, 0, 255]
    assert (data.images[2] == 100).all()
    gray = ImageFolderImages(str(tmp_path), size=8, channels=1).load().images
    assert gray.shape == (3, 1, 8, 8)
    assert gray[0, 0, 0, 0].item() == 76 and gray[1, 0, 0, 0].item() == 29  # ITU-R 601 luma


def test_image_folder_centre_crops_other_aspect_ratios(tmp_path):
    # A 10x20 image whose outer columns are black: the centre 10x10 crop is all grey.
    array = np.zeros((10, 20), dtype=np.uint8)
    array[:, 5:15] = 200
    _png(tmp_path / "only" / "wide.png", array)
    data = ImageFolderImages(str(tmp_path), size=10, channels=None).load()
    assert data.images.shape == (1, 1, 10, 10) and (data.images == 200).all()


def test_image_folder_size_none(tmp_path):
    _folder(tmp_path)
    with pytest.raises(ValueError, match=r"a\.png.*\(10, 12\).*c\.png.*\(20, 20\)"):
        ImageFolderImages(str(tmp_path), size=None).load()
    (tmp_path / "dog" / "sub" / "c.png").unlink()
    _png(tmp_path / "dog" / "d.png", np.zeros((10, 12, 3), dtype=np.uint8))
    assert ImageFolderImages(str(tmp_path), size=None).load().images.shape == (3, 3, 10, 12)


def test_image_folder_rejects_non_images_naming_them(tmp_path):
    _folder(tmp_path)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.txt.*\.png"):
        ImageFolderImages(str(tmp_path), size=8).load()
    (tmp_path / "dog" / "notes.txt").unlink()
    (tmp_path / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match=r"broken\.png"):
        ImageFolderImages(str(tmp_path), size=8).load()


def test_image_folder_empty_and_missing(tmp_path):
    with pytest.raises(ValueError, match="no class folders"):
        ImageFolderImages(str(tmp_path), size=8).load()
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match="empty_class.*no images"):
        ImageFolderImages(str(tmp_path), size=8).load()
    with pytest.raises(FileNotFoundError, match="absent"):
        ImageFolderImages(str(tmp_path / "absent"), size=8).fingerprint()


# ---------------------------------------------------------------- photo crops


def test_photo_crops_deterministic_and_shaped():
    a = PhotoCrops(n=12, size=16, seed=0).load()
    assert a.images.shape == (12, 3, 16, 16) and a.images.dtype == torch.uint8
    assert a.labels is None and a.classes is None
    assert torch.equal(a.images, PhotoCrops(n=12, size=16, seed=0).load().images)
    assert not torch.equal(a.images, PhotoCrops(n=12, size=16, seed=1).load().images)
    assert a.images.float().std() > 10  # real photo content, not a constant fill
    assert PhotoCrops(n=3, size=8, channels=1).load().images.shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="size"):
        PhotoCrops(size=500)


# ---------------------------------------------------------------- splits and checks


def test_split_random_is_a_seeded_partition_in_order():
    data = _indexed(100)
    train, val = split_images(data, 0.25, seed=3)
    assert (len(train), len(val)) == (75, 25)
    tr, va = train.images.flatten().tolist(), val.images.flatten().tolist()
    assert tr == sorted(tr) and va == sorted(va) and sorted(tr + va) == list(range(100))
    assert train.labels.tolist() == [i % 2 for i in tr] and val.classes == data.classes
    again = split_images(data, 0.25, seed=3)[1].images.flatten().tolist()
    other = split_images(data, 0.25, seed=4)[1].images.flatten().tolist()
    assert again == va and other != va and va != list(range(75, 100))


def test_split_tail_and_errors():
    train, val = split_images(_indexed(100), 0.1, method="tail")
    assert train.images.flatten().tolist() == list(range(90))
    assert val.images.flatten().tolist() == list(range(90, 100))
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=f"val_fraction.*{bad}"):
            split_images(_indexed(10), bad)
    with pytest.raises(ValueError, match="0 val"):
        split_images(_indexed(10), 0.01)
    with pytest.raises(ValueError, match="method.*'head'"):
        split_images(_indexed(10), 0.5, method="head")


def test_check_images_and_imageset_validation():
    check_images(torch.zeros(3, 8, 8, dtype=torch.uint8), 3, (8, 8), "enc")
    check_images(torch.zeros(2, 1, 5, 7, dtype=torch.uint8), 1, None, "fit")
    with pytest.raises(ValueError, match=r"enc.*torch.float32.*uint8"):
        check_images(torch.zeros(3, 8, 8), 3, (8, 8), "enc")
    with pytest.raises(ValueError, match=r"enc.*\(1, 8, 8\).*C in \(3,\)"):
        check_images(torch.zeros(1, 8, 8, dtype=torch.uint8), 3, (8, 8), "enc")
    with pytest.raises(ValueError, match=r"enc.*\(3, 8, 9\).*\(8, 8\)"):
        check_images(torch.zeros(3, 8, 9, dtype=torch.uint8), 3, (8, 8), "enc")
    with pytest.raises(ValueError, match="labels"):
        ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3).long(), ["a"], "x")
    mask = _indexed(6).subset(torch.tensor([True, False] * 3))
    assert mask.images.flatten().tolist() == [0, 2, 4] and mask.labels.tolist() == [0, 0, 0]


def test_fingerprints_track_settings_and_files(tmp_path):
    assert DigitsImages().fingerprint() == DigitsImages().fingerprint()
    assert DigitsImages().fingerprint() != DigitsImages(size=16).fingerprint()
    assert PhotoCrops(seed=0).fingerprint() != PhotoCrops(seed=1).fingerprint()
    _mnist_root(tmp_path / "m", {"test": 3}, gz=False)
    fp = MNISTImages(str(tmp_path / "m")).fingerprint()
    assert fp != MNISTImages(str(tmp_path / "m"), limit=2).fingerprint()
    os.utime(tmp_path / "m" / "t10k-images-idx3-ubyte", ns=(1, 1))
    assert fp != MNISTImages(str(tmp_path / "m")).fingerprint()
    folder = ImageFolderImages(str(_folder(tmp_path / "f")), size=8)
    assert isinstance(folder, ImageSource)
    fp = folder.fingerprint()
    assert fp != ImageFolderImages(str(tmp_path / "f"), size=16).fingerprint()
    _png(tmp_path / "f" / "dog" / "e.png", np.zeros((4, 4), dtype=np.uint8))
    assert fp != folder.fingerprint()
