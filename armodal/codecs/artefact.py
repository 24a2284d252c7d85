"""A trained codec as a frozen artefact: codec.safetensors + codec.json, no pickle.

codec.json holds the architecture (VQVAE arguments and the quantizer's kind and arguments), the
caller's metadata (image size, grid, metrics, ...) and the sha256 of the weights file, so an
image LM that records the hash can check that it still points at the codec it was trained on.
Loading rebuilds only armodal's own classes, chosen by an explicit check of the quantizer kind.

Both files are written under temporary names and renamed into place, codec.json last (and
removed first), so a directory killed midway never loads as a finished codec.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_model
from torch import nn

from armodal.checkpoint import save_weights_then_config
from armodal.codecs.fsq import FSQ
from armodal.codecs.quantizers import VectorQuantizer
from armodal.codecs.vqvae import VQVAE

WEIGHTS = "codec.safetensors"
CONFIG = "codec.json"
FORMAT_VERSION = 1
KIND = "armodal.vqvae"


def quantizer_spec(quantizer: nn.Module) -> dict:
    """{"kind": "vq" | "fsq", "kwargs": {...}} for the quantizers a codec file may hold."""
    if isinstance(quantizer, VectorQuantizer):
        return {"kind": "vq", "kwargs": quantizer.config()}
    if isinstance(quantizer, FSQ):
        return {"kind": "fsq", "kwargs": quantizer.config()}
    raise ValueError(f"cannot save a codec with quantizer {type(quantizer).__name__}; "
                     f"allowed: VectorQuantizer, FSQ")


def build_quantizer(spec: dict) -> nn.Module:
    """The inverse of quantizer_spec."""
    kind, kwargs = spec.get("kind"), spec.get("kwargs", {})
    if kind == "vq":
        return VectorQuantizer(**kwargs)
    if kind == "fsq":
        return FSQ(**kwargs)
    raise ValueError(f"unknown quantizer kind {kind!r}; allowed: 'vq', 'fsq'")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_codec(directory: str | Path, model: VQVAE, meta: dict | None = None) -> Path:
    """Write codec.safetensors + codec.json into `directory`; returns the directory.

    meta: JSON-serialisable extras (image_size, grid, metrics, train_config, ...)."""
    return save_weights_then_config(directory, model, WEIGHTS, CONFIG, lambda weights: {
        **(meta or {}),
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "model": model.config(),
        "quantizer": quantizer_spec(model.quantizer),
        "channels": model.in_channels,
        "codebook_size": model.codebook_size,
        "weights_sha256": file_sha256(weights),
    })


def read_codec_meta(directory: str | Path) -> dict:
    """codec.json of a finished codec directory, checked; raises naming the path otherwise."""
    directory = Path(directory).expanduser()
    weights, config_path = directory / WEIGHTS, directory / CONFIG
    if not directory.is_dir():
        raise FileNotFoundError(f"codec directory {str(directory)!r} does not exist; pass one "
                                f"written by `armodal train image_vq_tokenizer` (<run dir>/codec)")
    missing = [p.name for p in (weights, config_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"codec directory {str(directory)!r} has no "
                                f"{' / '.join(missing)}: the training did not finish, or this "
                                f"is not a codec directory (it needs {WEIGHTS} and {CONFIG})")
    try:
        meta = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the codec is damaged") \
            from err
    if not isinstance(meta, dict) or meta.get("kind") != KIND \
            or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is not an armodal codec of format version "
                         f"{FORMAT_VERSION} (kind {KIND!r})")
    return meta


def load_codec(directory: str | Path, device: str = "cpu") -> tuple[VQVAE, dict]:
    """Rebuild a saved codec: (VQVAE in eval mode with every parameter frozen, codec.json)."""
    directory = Path(directory).expanduser()
    meta = read_codec_meta(directory)
    weights = directory / WEIGHTS
    if file_sha256(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights} does not match the sha256 recorded in {CONFIG}: the "
                         f"weights were changed or damaged after the codec was saved")
    try:
        model = VQVAE(build_quantizer(meta["quantizer"]), **meta["model"])
        load_model(model, str(weights), strict=True)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{directory / CONFIG} does not describe a VQVAE ({err})") from err
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{weights} could not be loaded into the architecture in {CONFIG} "
                         f"({type(err).__name__}: {err})") from err
    model.requires_grad_(False)
    return model.to(device).eval(), meta
