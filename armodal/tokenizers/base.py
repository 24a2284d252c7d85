"""The tokenizer contract: Protocols, config round trip, and the conformance check.

A tokenizer is admitted into armodal by passing `check_tokenizer`, not by registering
itself anywhere: any class with the right shape works (structural typing).
"""

from __future__ import annotations

import importlib
import json
from typing import Any, Iterable, Protocol, runtime_checkable

import torch

__all__ = ["Tokenizer", "TrainableTokenizer", "tokenizer_from_config", "check_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """Maps samples of one modality to a stream of local ids in [0, vocab_size) and back.

    Attributes:
        modality: "text" | "image" | "audio" | "action" | ...
        vocab_size: number of local ids, including the tokenizer's own specials.
        unit: the unit bits are reported per (e.g. "byte" for text, so loss -> bits-per-byte).

    A tokenizer may set `lossless = False` (e.g. VQ codecs) to skip the exact round-trip check.
    """

    modality: str
    vocab_size: int
    unit: str

    def encode(self, sample: Any) -> torch.Tensor:
        """Return (T,) int64 local ids in [0, vocab_size)."""
        ...

    def decode(self, ids: torch.Tensor) -> Any:
        """Inverse of `encode`."""
        ...

    def count_units(self, sample: Any) -> int:
        """How many `unit`s the sample holds (e.g. its UTF-8 byte count for text)."""
        ...

    def config(self) -> dict:
        """JSON-serializable `{"target": dotted class path, "init": kwargs, "state": dict}`."""
        ...


@runtime_checkable
class TrainableTokenizer(Tokenizer, Protocol):
    """A tokenizer whose vocabulary is fitted from data."""

    is_fitted: bool

    def fit(self, samples: Iterable[Any]) -> None:
        """Fit the vocabulary on `samples`."""
        ...

    def state_dict(self) -> dict:
        """JSON-serializable fitted state."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Restore the state returned by `state_dict`."""
        ...


def tokenizer_from_config(cfg: dict) -> Tokenizer:
    """Rebuild a tokenizer from the output of its `config()`.

    Only classes inside the `armodal.` package are importable: configs travel with cached
    data and checkpoints, and an arbitrary dotted path (e.g. `os.system`) would be code execution.
    """
    target = cfg.get("target")
    if not isinstance(target, str) or not target.startswith("armodal."):
        raise ValueError(
            f"refusing tokenizer target {target!r}: only classes under 'armodal.' "
            "(e.g. 'armodal.tokenizers.text.BPETokenizer') can be built from a config"
        )
    module_name, _, class_name = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import tokenizer target {target!r}: {e}") from e
    # A module may re-export foreign names; only classes defined inside armodal are admitted.
    if not isinstance(cls, type) or not cls.__module__.startswith("armodal."):
        raise ValueError(f"tokenizer target {target!r} is not a class defined in armodal")
    tok = cls(**(cfg.get("init") or {}))
    state = cfg.get("state") or {}
    if state:
        tok.load_state_dict(state)
    return tok


def _same(a: Any, b: Any) -> bool:
    # Decoded samples may be str, tensors or arrays; `==` on the latter is elementwise.
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    result = a == b
    if hasattr(result, "all"):
        return bool(getattr(a, "shape", None) == getattr(b, "shape", None) and result.all())
    return bool(result)


def _short(x: Any, n: int = 80) -> str:
    r = repr(x)
    return r if len(r) <= n else r[:n] + "..."


def check_tokenizer(tok: Any, samples: Iterable[Any]) -> None:
    """Assert that `tok` honours the Tokenizer contract on `samples`.

    Checks: Protocol shape; positive int vocab_size; encode gives 1-D (or (K, T) for
    multi-stream tokenizers) int64 ids in [0, vocab_size); encode is deterministic;
    decode(encode(x)) == x unless `tok.lossless` is False; and a tokenizer rebuilt with
    `tokenizer_from_config` after a JSON round trip of `tok.config()` encodes identically.
    Raises AssertionError naming the first violation.
    """
    # Explicit raises, not `assert`: the check must still work under `python -O`.
    name = type(tok).__name__
    if not isinstance(tok, Tokenizer):
        raise AssertionError(
            f"{name} does not satisfy the Tokenizer protocol: needs modality, vocab_size, unit, "
            "encode, decode, count_units, config"
        )
    v = tok.vocab_size
    if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
        raise AssertionError(f"{name}.vocab_size must be a positive int, got {v!r}")
    samples = list(samples)
    if not samples:
        raise AssertionError("check_tokenizer needs at least one sample")
    lossless = getattr(tok, "lossless", True)
    for i, x in enumerate(samples):
        ids = tok.encode(x)
        where = f"{name}.encode(sample {i}: {_short(x)})"
        if not isinstance(ids, torch.Tensor):
            raise AssertionError(f"{where} returned {type(ids).__name__}, not a Tensor")
        # (K, T) is allowed for multi-stream tokenizers (RVQ codecs, per-dimension actions).
        if ids.ndim not in (1, 2):
            raise AssertionError(f"{where} returned shape {tuple(ids.shape)}, expected (T,) or (K, T)")
        if ids.dtype != torch.int64:
            raise AssertionError(f"{where} returned dtype {ids.dtype}, expected torch.int64")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise AssertionError(f"{where} gave ids in [{int(ids.min())}, {int(ids.max())}], outside [0, {v})")
        if not torch.equal(ids, tok.encode(x)):
            raise AssertionError(f"{where} is not deterministic")
        if lossless:
            back = tok.decode(ids)
            if not _same(back, x):
                raise AssertionError(
                    f"{name} is declared lossless but decode(encode(x)) != x for sample {i}: "
                    f"{_short(x)} -> {_short(back)}"
                )
    # Config last, so a broken encode/decode is reported as such rather than as a config failure.
    try:
        rebuilt = tokenizer_from_config(json.loads(json.dumps(tok.config())))
    except (TypeError, ValueError) as e:
        raise AssertionError(f"{name}.config() does not rebuild through JSON: {e}") from e
    for i, x in enumerate(samples):
        ids, again = tok.encode(x), rebuilt.encode(x)
        if not (isinstance(again, torch.Tensor) and torch.equal(ids, again)):
            shown = again.tolist() if isinstance(again, torch.Tensor) else again
            raise AssertionError(
                f"{name} rebuilt from config() encodes sample {i} differently: "
                f"{_short(ids.tolist())} vs {_short(shown)}"
            )
