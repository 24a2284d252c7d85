"""Exported model directories: safetensors weights + JSON metadata, no pickle.

A quantized model (armodal.quantize) is saved as its quantized tensors plus a `quantization`
entry in config.json, and loads back as the same quantized model.

A run directory is finished when it holds both `model.safetensors` and `config.json`; both are
written under temporary names and renamed into place, config last, so a process killed midway
never leaves a directory that loads as finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from armodal.model import ModelConfig, Transformer
from armodal.quantize import check_mode, quantize_model
from armodal.tokenizers.base import Tokenizer, tokenizer_from_config
from armodal.tokenizers.space import TokenSpace

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


@dataclass
class LoadedRun:
    """Everything generate / eval need, rebuilt from a run directory."""

    model: Transformer
    space: TokenSpace
    tokenizer: Tokenizer
    meta: dict
    path: Path


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name beside it: a process killed midway
    leaves the old file (or none), never a torn one that the next load reads."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_weights_then_config(directory: str | Path, model: torch.nn.Module, weights: str,
                             config: str, make_config: Callable[[Path], dict]) -> Path:
    """Write `weights` (safetensors) and then `config` (JSON, from make_config(weights path))
    into `directory`, each under a temporary name renamed into place. The old config goes
    first, so the directory only reads as finished once both new files are there."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / config).unlink(missing_ok=True)  # unfinished until the new config lands
    tmp = directory / (weights + ".tmp")
    # save_model handles tied weights (shared storage), which save_file refuses.
    save_model(model, str(tmp))
    os.replace(tmp, directory / weights)
    atomic_write_text(directory / config, json.dumps(make_config(directory / weights), indent=2))
    return directory


def save_run(run_dir: str | Path, model: Transformer, space: TokenSpace, tokenizer: Tokenizer,
             extra: dict | None = None) -> Path:
    """Write model.safetensors + config.json (model config, TokenSpace, tokenizer state, and
    the quantization mode of a quantized model)."""
    return save_weights_then_config(run_dir, model, WEIGHTS, CONFIG,
                                    lambda _: run_config(model, space, tokenizer, extra))


def run_config(model: Transformer, space: TokenSpace, tokenizer: Tokenizer,
               extra: dict | None) -> dict:
    config = {
        "format_version": FORMAT_VERSION,
        "model": model.config.to_dict(),
        "space": space.to_dict(),
        "tokenizer": tokenizer.config(),
        **(extra or {}),
    }
    quantization = getattr(model, "quantization", None)
    if quantization is not None:
        config["quantization"] = quantization
    return config


def instantiate_from_run(node: dict, what: str):
    """Build an object a run's config.json describes (a data source), refusing every
    `_target_` outside armodal, at any depth: a run directory is data someone may hand you, and
    Hydra would import and call a nested target such as os.system."""
    from hydra.utils import instantiate

    def check(value, path: str) -> None:
        if isinstance(value, dict):
            target = value.get("_target_")
            if target is not None and not str(target).startswith("armodal."):
                raise ValueError(f"run config names {path}._target_={target!r}; only "
                                 f"armodal's own classes are built from a run directory")
            for key, item in value.items():
                check(item, f"{path}.{key}")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                check(item, f"{path}[{i}]")

    if not isinstance(node, dict) or "_target_" not in node:
        raise ValueError(f"run config has no {what} to rebuild (expected a dict with _target_)")
    check(node, what)
    return instantiate(node)


def _dtype_kind(dtype: str | torch.dtype) -> str:
    """"float", "bool" or "int" for a safetensors dtype name ("F32", "BF16", "I8", "BOOL")
    or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return "float" if dtype.is_floating_point else "bool" if dtype == torch.bool else "int"
    return "float" if dtype.startswith(("F", "BF")) else "bool" if dtype == "BOOL" else "int"


def _check_weight_kinds(model: torch.nn.Module, weights: Path) -> None:
    """Refuse a tensor stored in `weights` as another kind of number (float / int / bool) than
    the model holds there: load_state_dict would cast it, and the stored bytes (say float32
    weights read as int32 after a damaged header) would load as wrong values, silently.
    Float to float (a model saved in fp16) is a lossless, legitimate cast and loads."""
    state = model.state_dict()
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            stored = f.get_slice(key).get_dtype()
            if key in state and _dtype_kind(stored) != _dtype_kind(state[key].dtype):
                raise ValueError(f"{weights} stores {key} as {stored}, but the model described "
                                 f"by {CONFIG} holds {state[key].dtype} there; the run directory "
                                 f"is damaged (re-export the run)")


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             quantize: str | None = None) -> LoadedRun:
    """Rebuild model, TokenSpace and tokenizer from a run directory written by save_run.

    quantize: one of armodal.quantize.QUANT_MODES to quantize a full-precision run on load
    (default settings); a run saved quantized loads as saved, and naming another mode is an
    error."""
    if quantize is not None:
        check_mode(quantize)
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} does not exist; pass "
                                f"run=<dir> with a directory written by `armodal train`")
    weights, config_path = run_dir / WEIGHTS, run_dir / CONFIG
    if not weights.is_file() or not config_path.is_file():
        missing = [p.name for p in (weights, config_path) if not p.is_file()]
        raise FileNotFoundError(
            f"run directory {str(run_dir)!r} has no {' / '.join(missing)}: the run did not "
            f"finish, or this is not a run directory (it needs {WEIGHTS} and {CONFIG})")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path} is not valid JSON ({err}); the run directory is "
                         f"damaged") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{config_path} holds a JSON {type(meta).__name__}, not an object; the "
                         f"run directory is damaged")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{config_path} has format_version {meta.get('format_version')!r}; "
                         f"this armodal reads version {FORMAT_VERSION}")
    missing = [key for key in ("model", "space", "tokenizer")
               if not isinstance(meta.get(key), dict)]
    if missing:
        raise ValueError(f"{config_path} has no {' / '.join(missing)} object; the run directory "
                         f"is damaged")
    try:
        space = TokenSpace.from_dict(meta["space"])
        tokenizer = tokenizer_from_config(meta["tokenizer"])
        model = Transformer(ModelConfig(**meta["model"]))
    except (KeyError, TypeError) as err:  # a field missing, misnamed or of the wrong type
        raise ValueError(f"{config_path} does not describe a run ({type(err).__name__}: {err}); "
                         f"the run directory is damaged") from err
    saved = meta.get("quantization")
    if saved is not None:
        if quantize is not None and quantize != saved["mode"]:
            raise ValueError(f"{run_dir} holds a {saved['mode']} model; it cannot be loaded as "
                             f"quantize={quantize!r} (quantize the full-precision run instead)")
        # The file holds quantized tensors: build the same quantized modules, then fill them.
        model = quantize_model(model.to(device), **saved)
    try:
        _check_weight_kinds(model, weights)
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{weights} could not be read as safetensors weights for this "
                         f"model ({type(err).__name__}: {err}); re-export the run") from err
    if missing or unexpected:
        raise ValueError(f"{weights} does not match {CONFIG}: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    if quantize is not None and saved is None:
        model = quantize_model(model.to(device), quantize)
        meta = {**meta, "quantization": model.quantization}
    return LoadedRun(model.to(device).eval(), space, tokenizer, meta, run_dir)
