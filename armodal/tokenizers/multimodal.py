"""MultimodalTokenizer: one tokenizer per modality, laid side by side in one TokenSpace.

A multimodal sample is a list of segments, (modality, content) pairs in reading order, e.g.

    [("image", <(1, 28, 28) uint8 tensor>), ("text", "a handwritten seven")]

and packs to  <boi> code ... code <eoi> <bot> a ... n <eot>  in the space's global ids: each
modality's local ids sit at its own offset, and per-modality begin/end markers delimit the
segments, so `split` finds them again and decoding can be held inside one segment's vocabulary.
The ids this tokenizer returns *are* global ids (its vocabulary is the whole TokenSpace, shared
specials included), so a multimodal run's space is `tokenizer.space` itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from armodal.tokenizers.base import tokenizer_from_config
from armodal.tokenizers.space import TokenSpace

__all__ = ["MARKERS", "MultimodalTokenizer", "Segment"]

# Begin / end markers per modality: <boi>/<eoi> as the image domains have always used.
MARKERS: dict[str, tuple[str, str]] = {
    "text": ("<bot>", "<eot>"),
    "image": ("<boi>", "<eoi>"),
    "audio": ("<boa>", "<eoa>"),
    "action": ("<boc>", "<eoc>"),
}

Segment = tuple[str, Any]  # (modality, content in the modality's natural form)


class MultimodalTokenizer:
    """Several single-modality tokenizers in one vocabulary, with shared specials and markers.

    Args:
        tokenizers: modality -> tokenizer (or its `config()` dict, as a run directory stores
            it), in layout order. Each key must be its tokenizer's `modality`.
        markers: modality -> (begin, end) marker names; default MARKERS for known modalities,
            <bo{m}>/<eo{m}> for others.
    """

    modality = "multimodal"
    unit = "token"
    lossless = False  # as lossless as its lossiest part (a VQ codec is not)

    def __init__(self, tokenizers: Mapping[str, Any],
                 markers: Mapping[str, Sequence[str]] | None = None) -> None:
        if not tokenizers:
            raise ValueError("MultimodalTokenizer needs at least one tokenizer")
        self.parts: dict[str, Any] = {}
        for name, tok in tokenizers.items():
            if isinstance(tok, Mapping):  # a stored config() dict
                tok = tokenizer_from_config(dict(tok))
            if getattr(tok, "modality", None) != name:
                raise ValueError(f"tokenizers[{name!r}] is a {getattr(tok, 'modality', '?')!r} "
                                 f"tokenizer; key each tokenizer by its own modality")
            if getattr(tok, "n_levels", 1) != 1:
                raise ValueError(f"the {name!r} tokenizer gives {tok.n_levels} code streams; a "
                                 f"multimodal sequence takes one per segment (an audio codec: "
                                 f"n_q=1)")
            self.parts[name] = tok
        marks = {m: tuple(markers[m]) if markers and m in markers
                 else MARKERS.get(m, (f"<bo{m[0]}>", f"<eo{m[0]}>")) for m in self.parts}
        self._markers = marks
        self._space: TokenSpace | None = None

    # The space depends on the parts' vocab sizes, which a trainable part (a char alphabet)
    # only knows once fitted: it is built on first use.
    @property
    def space(self) -> TokenSpace:
        if self._space is None:
            unfitted = [m for m, t in self.parts.items() if not getattr(t, "is_fitted", True)]
            if unfitted:
                raise ValueError(f"fit the multimodal tokenizer first: {unfitted} not fitted")
            self._space = TokenSpace({m: t.vocab_size for m, t in self.parts.items()},
                                     self._markers)
        return self._space

    @property
    def vocab_size(self) -> int:
        return self.space.vocab_size

    @property
    def is_fitted(self) -> bool:
        return all(getattr(t, "is_fitted", True) for t in self.parts.values())

    def fit(self, samples: Iterable[Sequence[Segment]]) -> None:
        """Fit every trainable, unfitted part on its modality's contents of `samples`."""
        samples = list(samples)
        for m, tok in self.parts.items():
            if not getattr(tok, "is_fitted", True):
                tok.fit([content for sample in samples for mod, content in sample if mod == m])
        self._space = None

    def part(self, modality: str) -> Any:
        """The tokenizer of `modality`; a ValueError names the modalities there are."""
        if modality not in self.parts:
            raise ValueError(f"this run has no {modality!r} tokenizer; its modalities: "
                             f"{', '.join(self.parts)}")
        return self.parts[modality]

    def markers(self, modality: str) -> tuple[int, int]:
        """Global ids of `modality`'s (begin, end) markers."""
        self.part(modality)
        begin, end = self._markers[modality]
        return self.space.special_ids[begin], self.space.special_ids[end]

    def encode_segment(self, modality: str, content: Any) -> Tensor:
        """(S,) global ids of one segment, markers included."""
        local = _one_stream(modality, self.part(modality).encode(content))
        return self.space.pack([(modality, local)], bos=False, eos=False)

    def encode(self, sample: Sequence[Segment]) -> Tensor:
        """(T,) global ids of the segments in order, each between its markers (no bos / eos)."""
        if isinstance(sample, (str, bytes)) or not isinstance(sample, Sequence):
            raise ValueError(f"a multimodal sample is a list of (modality, content) segments, "
                             f"got {type(sample).__name__}")
        parts = [self.encode_segment(*_segment(seg, i)) for i, seg in enumerate(sample)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def encode_many(self, samples: Sequence[Sequence[Segment]]) -> list[Tensor]:
        """`encode` of each sample, with each modality's contents encoded in one batched call
        where its tokenizer has `encode_batch` (a VQ codec: one encoder pass per 256 images
        instead of one per image) or `encode_clips` (an audio codec: clips of any lengths, in
        batches), and each distinct content encoded once (the two reading orders of a pair hold
        the same image or clip). Equal to [encode(s) for s in samples]."""
        where: dict[str, list[tuple[int, int]]] = {}  # modality -> (sample, segment) positions
        for i, sample in enumerate(samples):
            for j, seg in enumerate(sample):
                where.setdefault(_segment(seg, j)[0], []).append((i, j))
        local: dict[tuple[int, int], Tensor] = {}
        for m, places in where.items():
            distinct, which = _distinct([samples[i][j][1] for i, j in places])
            encoded = self._encode_contents(m, distinct)
            for place, k in zip(places, which):
                local[place] = _one_stream(m, encoded[k])
        return [self.space.pack([(m, local[i, j]) for j, (m, _) in enumerate(sample)],
                                bos=False, eos=False) for i, sample in enumerate(samples)]

    def _encode_contents(self, modality: str, contents: list) -> list[Tensor]:
        part = self.part(modality)
        batch = getattr(part, "encode_batch", None)
        if batch is None:
            return [part.encode(c) for c in contents]
        if all(isinstance(c, Tensor) for c in contents) and \
                len({tuple(c.shape) for c in contents}) == 1:
            return list(batch(torch.stack(contents)))  # images: one (N, ...) tensor
        if all(isinstance(c, str) for c in contents):
            return list(batch(contents))
        clips = getattr(part, "encode_clips", None)  # audio codecs: clips of any lengths
        if clips is not None and all(isinstance(c, Tensor) for c in contents):
            return clips(contents)
        return [part.encode(c) for c in contents]

    def decode(self, ids: Tensor | Sequence[int]) -> list[Segment]:
        """Global ids -> [(modality, decoded content)]; specials are dropped."""
        return [(m, self.decode_segment(m, local)) for m, local in self.space.split(ids)]

    def decode_segment(self, modality: str, local: Tensor) -> Any:
        """One segment's local ids (S,) -> its content (a one-level codec takes (1, S))."""
        part = self.part(modality)
        # A codec (codebook_size, n_levels) decodes (K, T) codes; K = 1 here.
        return part.decode(local[None] if hasattr(part, "codebook_size") else local)

    def count_units(self, sample: Sequence[Segment]) -> int:
        return int(self.encode(sample).numel())

    def segment_length(self, modality: str) -> int | None:
        """A fixed-length modality's ids per segment (an image's codes), else None (text)."""
        layout = getattr(self.part(modality), "layout", None)
        return int(layout.length) if layout is not None and hasattr(layout, "length") else None

    def config(self) -> dict:
        return {"target": f"{type(self).__module__}.{type(self).__qualname__}",
                "init": {"tokenizers": {m: t.config() for m, t in self.parts.items()},
                         "markers": {m: list(p) for m, p in self._markers.items()}},
                "state": {}}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """The parts' states travel inside `config()['init']`; nothing else to restore."""


def _distinct(contents: list) -> tuple[list, list[int]]:
    """(the distinct contents, the index into them of each content). Tensors are the same when
    their dtype, shape and bytes are (found by a digest of the bytes, confirmed by
    torch.equal); strings when they are equal; anything else only when it is the same object."""
    distinct: list = []
    seen: dict[Any, int] = {}  # key -> index into distinct
    which = []
    for c in contents:
        if isinstance(c, Tensor):
            data = c.detach().cpu().contiguous()
            key = (str(data.dtype), tuple(data.shape), hashlib.blake2b(
                data.reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=16).digest())
        else:
            key = c if isinstance(c, str) else ("object", id(c))
        k = seen.get(key)
        if k is None or (isinstance(c, Tensor) and not torch.equal(distinct[k], c)):
            k = len(distinct)
            distinct.append(c)
            seen.setdefault(key, k)
        which.append(k)
    return distinct, which


def _one_stream(modality: str, ids: Tensor) -> Tensor:
    """A segment's (T,) ids: a one-level codec's (1, T) codes squeezed; several streams are an
    error (a multimodal sequence holds one per segment)."""
    ids = ids[0] if ids.ndim == 2 and ids.shape[0] == 1 else ids
    if ids.ndim != 1:
        raise ValueError(f"the {modality!r} tokenizer gives {tuple(ids.shape)} ids; a "
                         f"multimodal sequence takes one stream per segment")
    return ids


def _segment(seg: Any, index: int) -> Segment:
    if not (isinstance(seg, (tuple, list)) and len(seg) == 2 and isinstance(seg[0], str)):
        raise ValueError(f"segment {index} must be a (modality, content) pair, got "
                         f"{type(seg).__name__}")
    return seg[0], seg[1]
