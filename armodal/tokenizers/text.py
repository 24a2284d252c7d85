"""Text tokenizers: raw UTF-8 bytes, a fitted character alphabet, and byte-level BPE.

All three report `unit = "byte"` and count UTF-8 bytes, so losses convert to bits-per-byte
comparably across tokenizers.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

__all__ = ["ByteTokenizer", "CharTokenizer", "BPETokenizer"]


def _target(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_unicode(sample: str, where: str) -> None:
    """ValueError naming the first lone surrogate (U+D800-U+DFFF) in `sample` and its position:
    Python str may hold one, but it is not text any tokenizer can hold (it has no UTF-8)."""
    if sample.isascii():  # the common case, checked at memory speed
        return
    try:
        sample.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{where} is not valid Unicode: it holds the lone surrogate {sample[err.start]!r} at "
            f"character {err.start} (U+D800-U+DFFF alone are not text and have no UTF-8)") from err


def _check_str(sample: object, who: str) -> str:
    if not isinstance(sample, str):
        raise TypeError(f"{who}.encode expects str, got {type(sample).__name__}")
    _check_unicode(sample, f"{who}.encode: the text")
    return sample


def _check_document(sample: object, index: int, who: str) -> str:
    """One document of a fit corpus: a str of valid Unicode, else an error naming its index."""
    if not isinstance(sample, str):
        raise TypeError(f"{who}.fit expects an iterable of str; document {index} of the corpus "
                        f"is {type(sample).__name__}, not str")
    _check_unicode(sample, f"{who}.fit: document {index} of the corpus")
    return sample


def _checked_corpus(samples: Iterable[str], who: str) -> Iterator[str]:
    """`samples`, streamed, each checked by _check_document as it is consumed."""
    for index, sample in enumerate(samples):
        yield _check_document(sample, index, who)


def _check_ids(ids: torch.Tensor, vocab_size: int, who: str) -> list[int]:
    ids = torch.as_tensor(ids)
    if ids.ndim != 1:
        raise ValueError(f"{who}.decode expects 1-D ids, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = ids[(ids < 0) | (ids >= vocab_size)][0].item()
        raise ValueError(f"{who}.decode got id {bad}, allowed range is [0, {vocab_size})")
    return ids.tolist()


class ByteTokenizer:
    """UTF-8 bytes as ids (vocab 256). Lossless for any str; never needs fitting."""

    modality = "text"
    unit = "byte"
    vocab_size = 256
    lossless = True

    def encode(self, sample: str) -> torch.Tensor:
        """Return the UTF-8 bytes of `sample` as (T,) int64 ids."""
        data = _check_str(sample, "ByteTokenizer").encode("utf-8")
        return torch.from_numpy(np.frombuffer(data, dtype=np.uint8).astype(np.int64))

    def encode_batch(self, samples: list[str]) -> list[torch.Tensor]:
        """Encode each sample."""
        return [self.encode(s) for s in samples]

    def decode(self, ids: torch.Tensor) -> str:
        """Bytes back to str; invalid UTF-8 (possible from sampled ids) becomes U+FFFD."""
        return bytes(_check_ids(ids, 256, "ByteTokenizer")).decode("utf-8", errors="replace")

    def count_units(self, sample: str) -> int:
        """UTF-8 byte count."""
        return len(sample.encode("utf-8"))

    def config(self) -> dict:
        """See `Tokenizer.config`."""
        return {"target": _target(self), "init": {}, "state": {}}


class CharTokenizer:
    """One id per character of an alphabet fitted from the training corpus."""

    modality = "text"
    unit = "byte"
    lossless = True

    def __init__(self, alphabet: str | None = None) -> None:
        self.alphabet = ""
        self.vocab_size = 0
        self._codes = np.zeros(0, dtype=np.uint32)
        if alphabet is not None:
            self.load_state_dict({"alphabet": alphabet})

    @property
    def is_fitted(self) -> bool:
        return bool(self.alphabet)

    def fit(self, samples: Iterable[str]) -> None:
        """Set the alphabet to the sorted set of characters in `samples` (an iterable of str).

        ValueError naming the document and position of a lone surrogate, or for a corpus with
        no characters; TypeError naming a document that is not a str."""
        chars: set[str] = set()
        for index, s in enumerate(samples):
            if not isinstance(s, str):
                _check_document(s, index, "CharTokenizer")
            size = len(chars)
            chars.update(s)
            # A lone surrogate would be a new character: only a document that adds characters
            # needs the (linear) Unicode check, so a large corpus costs about one set update.
            if len(chars) != size:
                _check_document(s, index, "CharTokenizer")
        if not chars:
            raise ValueError("CharTokenizer.fit: the corpus holds no characters (no documents, "
                             "or only empty ones)")
        self.load_state_dict({"alphabet": "".join(sorted(chars))})

    def state_dict(self) -> dict:
        """`{"alphabet": str}`."""
        return {"alphabet": self.alphabet}

    def load_state_dict(self, state: dict) -> None:
        """Restore an alphabet from `state_dict()` output."""
        alphabet = state["alphabet"]
        if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
            raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {alphabet!r}")
        _check_unicode(alphabet, "CharTokenizer alphabet")
        self.alphabet = "".join(sorted(alphabet))
        self.vocab_size = len(self.alphabet)
        # Sorted code points let encode use one vectorized searchsorted instead of a Python loop.
        self._codes = self._codepoints(self.alphabet)

    @staticmethod
    def _codepoints(s: str) -> np.ndarray:
        # surrogatepass: Python str may hold lone surrogates and they must not crash encode.
        return np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype="<u4")

    def _require_fitted(self) -> None:
        if not self.is_fitted:
            raise RuntimeError("CharTokenizer has no alphabet: call fit(samples) or pass alphabet= first")

    def encode(self, sample: str) -> torch.Tensor:
        """Return one id per character; ValueError for characters outside the alphabet."""
        self._require_fitted()
        cps = self._codepoints(_check_str(sample, "CharTokenizer"))
        idx = np.searchsorted(self._codes, cps)
        idx_c = np.minimum(idx, len(self._codes) - 1)
        unknown = self._codes[idx_c] != cps
        if unknown.any():
            bad = sorted({chr(c) for c in cps[unknown][:1000].tolist()})
            raise ValueError(
                f"CharTokenizer cannot encode character(s) {', '.join(map(repr, bad[:20]))}: "
                f"not in its alphabet of {self.vocab_size} characters fitted from the training corpus"
            )
        return torch.from_numpy(idx.astype(np.int64))

    def encode_batch(self, samples: list[str]) -> list[torch.Tensor]:
        """Encode each sample."""
        return [self.encode(s) for s in samples]

    def decode(self, ids: torch.Tensor) -> str:
        """Ids back to the string of alphabet characters."""
        self._require_fitted()
        idx = np.asarray(_check_ids(ids, self.vocab_size, "CharTokenizer"), dtype=np.int64)
        return self._codes[idx].astype("<u4").tobytes().decode("utf-32-le", "surrogatepass")

    def count_units(self, sample: str) -> int:
        """UTF-8 byte count (not characters), so bits-per-byte compares across tokenizers."""
        return len(sample.encode("utf-8", "surrogatepass"))

    def config(self) -> dict:
        """See `Tokenizer.config`."""
        return {"target": _target(self), "init": {}, "state": self.state_dict() if self.is_fitted else {}}


class BPETokenizer:
    """Byte-level BPE trained with Hugging Face `tokenizers`; lossless on any Unicode text.

    Adds no special tokens: bos/eos/pad belong to armodal's TokenSpace.
    """

    modality = "text"
    unit = "byte"
    lossless = True

    def __init__(self, vocab_size: int = 4096, min_frequency: int = 2) -> None:
        if not isinstance(vocab_size, int) or vocab_size < 256:
            raise ValueError(f"BPETokenizer vocab_size must be an int >= 256 (the byte alphabet), got {vocab_size!r}")
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"BPETokenizer min_frequency must be an int >= 1, got {min_frequency!r}")
        self._init = {"vocab_size": vocab_size, "min_frequency": min_frequency}
        # Until fitted this is the requested size; afterwards the actual trained size.
        self.vocab_size = vocab_size
        self._tok: _HFTokenizer | None = None

    @property
    def is_fitted(self) -> bool:
        return self._tok is not None

    def fit(self, samples: Iterable[str]) -> None:
        """Train the merges on `samples` (an iterable of str, streamed); errors as
        CharTokenizer.fit for a document that is not a str or holds a lone surrogate."""
        tok = _HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=self._init["vocab_size"],
            min_frequency=self._init["min_frequency"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(_checked_corpus(samples, "BPETokenizer"), trainer=trainer)
        self._set(tok)

    def _set(self, tok: _HFTokenizer) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()

    def state_dict(self) -> dict:
        """`{"tokenizer": <HF tokenizer JSON string>}`."""
        return {"tokenizer": self._hf().to_str()}

    def load_state_dict(self, state: dict) -> None:
        """Restore from `state_dict()` output."""
        self._set(_HFTokenizer.from_str(state["tokenizer"]))

    def _hf(self) -> _HFTokenizer:
        if self._tok is None:
            raise RuntimeError("BPETokenizer is not fitted: call fit(samples) or load_state_dict first")
        return self._tok

    def encode(self, sample: str) -> torch.Tensor:
        """Return (T,) int64 BPE ids."""
        ids = self._hf().encode(_check_str(sample, "BPETokenizer"), add_special_tokens=False).ids
        return torch.tensor(ids, dtype=torch.int64)

    def encode_batch(self, samples: list[str]) -> list[torch.Tensor]:
        """Encode many samples with the parallel Rust batch API."""
        for s in samples:
            _check_str(s, "BPETokenizer")
        encs = self._hf().encode_batch(list(samples), add_special_tokens=False)
        return [torch.tensor(e.ids, dtype=torch.int64) for e in encs]

    def decode(self, ids: torch.Tensor) -> str:
        """Ids back to text; invalid byte sequences from sampled ids become U+FFFD."""
        tok = self._hf()
        return tok.decode(_check_ids(ids, self.vocab_size, "BPETokenizer"), skip_special_tokens=False)

    def count_units(self, sample: str) -> int:
        """UTF-8 byte count."""
        return len(sample.encode("utf-8"))

    def config(self) -> dict:
        """See `Tokenizer.config`."""
        return {"target": _target(self), "init": dict(self._init), "state": self.state_dict() if self.is_fitted else {}}
