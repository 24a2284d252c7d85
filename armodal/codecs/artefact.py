"""A trained codec as a frozen artefact: codec.safetensors + codec.json, no pickle.

Two kinds of codec: the image VQVAE (kind "armodal.vqvae") and the AudioCodec (kind
"armodal.audio_codec"). codec.json holds the kind, the architecture (the model's arguments and
the quantizer's kind and arguments), the caller's metadata (image size and grid, or sample rate,
hop, levels and frame rate; metrics, ...) and the sha256 of the weights file, so an LM that
records the hash can check that it still points at the codec it was trained on. Loading
rebuilds only armodal's own classes, chosen by explicit checks of the codec and quantizer kinds.

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
from armodal.codecs.audio_codec import AudioCodec
from armodal.codecs.fsq import FSQ
from armodal.codecs.quantizers import VectorQuantizer
from armodal.codecs.rvq import ResidualVQ
from armodal.codecs.vqvae import VQVAE

WEIGHTS = "codec.safetensors"
CONFIG = "codec.json"
FORMAT_VERSION = 1
KIND = "armodal.vqvae"
AUDIO_KIND = "armodal.audio_codec"


def quantizer_spec(quantizer: nn.Module) -> dict:
    """{"kind": "vq" | "fsq", "kwargs": {...}} for the quantizers a codec file may hold."""
    if isinstance(quantizer, VectorQuantizer):
        return {"kind": "vq", "kwargs": quantizer.config()}
    if isinstance(quantizer, FSQ):
        return {"kind": "fsq", "kwargs": quantizer.config()}
    if isinstance(quantizer, ResidualVQ):
        return {"kind": "rvq", "kwargs": quantizer.config()}
    raise ValueError(f"cannot save a codec with quantizer {type(quantizer).__name__}; "
                     f"allowed: VectorQuantizer, FSQ, ResidualVQ")


def build_quantizer(spec: dict) -> nn.Module:
    """The inverse of quantizer_spec."""
    kind, kwargs = spec.get("kind"), spec.get("kwargs", {})
    if kind == "vq":
        return VectorQuantizer(**kwargs)
    if kind == "fsq":
        return FSQ(**kwargs)
    if kind == "rvq":
        return ResidualVQ(**kwargs)
    raise ValueError(f"unknown quantizer kind {kind!r}; allowed: 'vq', 'fsq', 'rvq'")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def kind_fields(model: VQVAE | AudioCodec) -> dict:
    """codec.json fields that depend on the kind of codec: the kind and what users read."""
    if isinstance(model, VQVAE):
        return {"kind": KIND, "channels": model.in_channels}
    if isinstance(model, AudioCodec):
        return {"kind": AUDIO_KIND, "sample_rate": model.sample_rate, "hop": model.hop,
                "n_levels": model.n_levels, "frame_rate": model.frame_rate,
                "bitrate": model.bitrate()}
    raise ValueError(f"cannot save a codec of type {type(model).__name__}; allowed: VQVAE, "
                     f"AudioCodec")


def save_codec(directory: str | Path, model: VQVAE | AudioCodec, meta: dict | None = None) \
        -> Path:
    """Write codec.safetensors + codec.json into `directory`; returns the directory.

    meta: JSON-serialisable extras (image_size, grid, metrics, train_config, ...)."""
    fields = kind_fields(model)  # refuses other models before anything is written
    return save_weights_then_config(directory, model, WEIGHTS, CONFIG, lambda weights: {
        **(meta or {}),
        "format_version": FORMAT_VERSION,
        **fields,
        "model": model.config(),
        "quantizer": quantizer_spec(model.quantizer),
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
    if not isinstance(meta, dict) or meta.get("kind") not in (KIND, AUDIO_KIND) \
            or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} is not an armodal codec of format version "
                         f"{FORMAT_VERSION} (kind {KIND!r} or {AUDIO_KIND!r})")
    return meta


RECIPES = {KIND: "image_vq_tokenizer", AUDIO_KIND: "audio_codec"}


def load_codec(directory: str | Path, device: str = "cpu",
               kind: str | None = None) -> tuple[VQVAE | AudioCodec, dict]:
    """Rebuild a saved codec: (the model in eval mode with every parameter frozen, codec.json).

    The model is a VQVAE for kind "armodal.vqvae", an AudioCodec for "armodal.audio_codec";
    `kind` refuses any other kind, naming the recipe that writes the right one."""
    directory = Path(directory).expanduser()
    meta = read_codec_meta(directory)
    if kind is not None and meta["kind"] != kind:
        raise ValueError(f"codec {str(directory)!r} is a {meta['kind']} codec; this needs a "
                         f"{kind} codec, written by `armodal train {RECIPES[kind]}`")
    weights = directory / WEIGHTS
    if file_sha256(weights) != meta.get("weights_sha256"):
        raise ValueError(f"{weights} does not match the sha256 recorded in {CONFIG}: the "
                         f"weights were changed or damaged after the codec was saved")
    try:
        quantizer = build_quantizer(meta["quantizer"])
        if meta["kind"] == AUDIO_KIND:
            model = AudioCodec(quantizer, **meta["model"])
        else:
            model = VQVAE(quantizer, **meta["model"])
        load_model(model, str(weights), strict=True)
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{directory / CONFIG} does not describe a {meta['kind']} codec "
                         f"({type(err).__name__}: {err})") from err
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{weights} could not be loaded into the architecture in {CONFIG} "
                         f"({type(err).__name__}: {err})") from err
    model.requires_grad_(False)
    return model.to(device).eval(), meta


def check_codec_state(directory: Path, sha256: str, state: dict) -> None:
    """A codec tokenizer's load_state_dict: the run's recorded codec hash must be this codec's,
    so a language model never decodes with another codec than the one it was trained on."""
    want = state.get("codec_sha256")
    if want is not None and want != sha256:
        raise ValueError(f"codec {str(directory)!r} has weights sha256 {sha256[:12]}..., but this "
                         f"model was trained on codes of a codec with {want[:12]}...; point "
                         f"codec= at the codec the run was trained with")
