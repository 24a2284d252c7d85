"""TokenSpace: the single global vocabulary shared by all modalities.

Layout (ids ascending): <pad>=0, <bos>=1, <eos>=2, then each marked modality's
(begin, end) markers, then each modality's local ids at its own offset, in the order given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

__all__ = ["TokenSpace"]

_SHARED = ("<pad>", "<bos>", "<eos>")


@dataclass
class TokenSpace:
    """Offsets, shared specials, packing and splitting for mixed-modality id sequences.

    Args:
        modalities: modality name -> local vocab size, in layout order.
        markers: modality -> (begin, end) marker names, e.g. {"image": ("<boi>", "<eoi>")}.
    """

    modalities: dict[str, int]
    markers: dict[str, tuple[str, str]] | None = None
    special_ids: dict[str, int] = field(init=False, repr=False)
    vocab_size: int = field(init=False, repr=False)
    _offsets: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.modalities = dict(self.modalities)
        if not self.modalities:
            raise ValueError("TokenSpace needs at least one modality")
        for name, size in self.modalities.items():
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise ValueError(f"vocab size of modality {name!r} must be a positive int, got {size!r}")
        self.markers = {m: tuple(pair) for m, pair in (self.markers or {}).items()}
        for m, pair in self.markers.items():
            self._check(m)
            if len(pair) != 2:
                raise ValueError(f"markers[{m!r}] must be a (begin, end) pair, got {pair!r}")
        self.special_ids = {name: i for i, name in enumerate(_SHARED)}
        # Markers follow the modality order so the layout depends only on `modalities` order.
        for m in self.modalities:
            for name in self.markers.get(m, ()):
                if name in self.special_ids:
                    raise ValueError(f"special token name {name!r} is used twice")
                self.special_ids[name] = len(self.special_ids)
        self._offsets, nxt = {}, len(self.special_ids)
        for m, size in self.modalities.items():
            self._offsets[m], nxt = nxt, nxt + size
        self.vocab_size = nxt
        # id -> modality index (-1 for specials) lets split classify ids in one tensor op.
        self._owner = torch.full((self.vocab_size,), -1, dtype=torch.int64)
        for k, m in enumerate(self.modalities):
            self._owner[self._offsets[m] : self._offsets[m] + self.modalities[m]] = k
        self._begin = {self.special_ids[b]: m for m, (b, _) in self.markers.items()}
        self._end = {self.special_ids[e]: m for m, (_, e) in self.markers.items()}

    @classmethod
    def for_tokenizers(cls, *tokenizers: Any, markers: dict[str, tuple[str, str]] | None = None) -> TokenSpace:
        """Build a space from tokenizers' `modality` and `vocab_size`, in the order given."""
        modalities: dict[str, int] = {}
        for tok in tokenizers:
            if tok.modality in modalities:
                raise ValueError(f"two tokenizers share modality {tok.modality!r}; each modality needs exactly one")
            modalities[tok.modality] = tok.vocab_size
        return cls(modalities, markers)

    @property
    def pad_id(self) -> int:
        return self.special_ids["<pad>"]

    @property
    def bos_id(self) -> int:
        return self.special_ids["<bos>"]

    @property
    def eos_id(self) -> int:
        return self.special_ids["<eos>"]

    def _check(self, modality: str) -> None:
        if modality not in self.modalities:
            raise ValueError(f"unknown modality {modality!r}; known modalities: {list(self.modalities)}")

    def offset(self, modality: str) -> int:
        """First global id of `modality`'s local ids."""
        self._check(modality)
        return self._offsets[modality]

    def _range_error(self, modality: str, bad: int, local: bool) -> ValueError:
        lo = 0 if local else self._offsets[modality]
        kind = "local" if local else "global"
        return ValueError(
            f"{kind} id {bad} is outside modality {modality!r}'s {kind} range "
            f"[{lo}, {lo + self.modalities[modality]})"
        )

    def to_global(self, modality: str, local_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Shift local ids of `modality` into the global vocabulary."""
        self._check(modality)
        ids = torch.as_tensor(local_ids, dtype=torch.int64)
        bad = (ids < 0) | (ids >= self.modalities[modality])
        if bad.any():
            raise self._range_error(modality, int(ids[bad][0]), local=True)
        return ids + self._offsets[modality]

    def to_local(self, modality: str, global_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """Inverse of `to_global`; ValueError for any id outside `modality`'s range."""
        self._check(modality)
        ids = torch.as_tensor(global_ids, dtype=torch.int64)
        lo = self._offsets[modality]
        bad = (ids < lo) | (ids >= lo + self.modalities[modality])
        if bad.any():
            raise self._range_error(modality, int(ids[bad][0]), local=False)
        return ids - lo

    def modality_mask(self, modality: str, include: Sequence[str] = ()) -> torch.Tensor:
        """(vocab_size,) bool mask, True on `modality`'s ids and on the specials named in `include`."""
        self._check(modality)
        mask = torch.zeros(self.vocab_size, dtype=torch.bool)
        lo = self._offsets[modality]
        mask[lo : lo + self.modalities[modality]] = True
        for name in include:
            if name not in self.special_ids:
                raise ValueError(f"unknown special token {name!r}; known: {list(self.special_ids)}")
            mask[self.special_ids[name]] = True
        return mask

    def layout_masks(self, layout: Sequence[str | int]) -> torch.Tensor:
        """(S, vocab_size) bool step masks for decoding a segment of known layout.

        layout[s] names what step s may produce: a modality (any of its ids), a special or
        marker name (exactly that token, e.g. "<eoi>"), or a global id. With these masks
        `generate(..., step_masks=...)` emits exactly the layout: e.g. an H x W image is
        ["image"] * (H * W) + ["<eoi>"], or rows ending in an end-of-row marker.
        """
        masks = torch.zeros(len(layout), self.vocab_size, dtype=torch.bool)
        for step, item in enumerate(layout):
            if isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < self.vocab_size:
                    raise ValueError(f"layout step {step}: id {item} is outside the vocabulary "
                                     f"[0, {self.vocab_size})")
                masks[step, item] = True
            elif item in self.special_ids:
                masks[step, self.special_ids[item]] = True
            elif item in self.modalities:
                masks[step] = self.modality_mask(item)
            else:
                raise ValueError(f"layout step {step}: {item!r} is neither a modality "
                                 f"{list(self.modalities)}, a special token "
                                 f"{list(self.special_ids)} nor a global id")
        return masks

    def pack(self, segments: Sequence[tuple[str, torch.Tensor]], bos: bool = True, eos: bool = True) -> torch.Tensor:
        """(T,) int64 global ids: [<bos>] ([begin] ids [end])... [<eos>]."""
        parts = [torch.tensor([self.bos_id])] if bos else []
        for modality, local in segments:
            ids = self.to_global(modality, local)
            if ids.ndim != 1:
                # Multi-stream (K, T) ids must be laid out by a stream pattern before packing.
                raise ValueError(f"pack expects 1-D local ids per segment, got shape {tuple(ids.shape)} for {modality!r}")
            pair = self.markers.get(modality)
            if pair:
                b, e = (torch.tensor([self.special_ids[n]]) for n in pair)
                ids = torch.cat([b, ids, e])
            parts.append(ids)
        if eos:
            parts.append(torch.tensor([self.eos_id]))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def split(self, ids: torch.Tensor | Sequence[int]) -> list[tuple[str, torch.Tensor]]:
        """Inverse of `pack`: per-segment (modality, local ids), dropping <pad>/<bos>/<eos>.

        Marked segments are delimited by their markers (an unterminated one, e.g. from
        truncated generation, still counts). Ids outside markers are grouped into contiguous
        runs of the same modality. Shared specials end the current run.
        """
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0].item()
            raise ValueError(f"id {bad} is outside the vocabulary [0, {self.vocab_size})")
        names = list(self.modalities)
        out: list[tuple[str, torch.Tensor]] = []
        cur: int | None = None  # modality index of the open run
        marked, start = False, 0  # whether the open run began with a marker; its first position

        def close(end: int) -> None:
            if cur is not None and (end > start or marked):
                m = names[cur]
                out.append((m, ids[start:end] - self._offsets[m]))

        for pos, (tok, own) in enumerate(zip(ids.tolist(), self._owner[ids].tolist())):
            if own >= 0:
                if own != cur:  # a new modality starts a new run (also inside a foreign marker)
                    close(pos)
                    cur, marked, start = own, False, pos
                continue
            close(pos)
            cur, marked = None, False
            if tok in self._begin:
                cur, marked, start = names.index(self._begin[tok]), True, pos + 1
        close(len(ids))
        return out

    def to_dict(self) -> dict:
        """JSON-serializable description; `from_dict` rebuilds the same layout."""
        return {
            "modalities": dict(self.modalities),
            "markers": {m: list(pair) for m, pair in self.markers.items()},
            "vocab_size": self.vocab_size,
        }

    @classmethod
    def from_dict(cls, d: dict) -> TokenSpace:
        """Rebuild from `to_dict()` output."""
        space = cls(d["modalities"], {m: tuple(p) for m, p in (d.get("markers") or {}).items()})
        if "vocab_size" in d and d["vocab_size"] != space.vocab_size:
            raise ValueError(f"vocab_size mismatch: stored {d['vocab_size']}, rebuilt {space.vocab_size}")
        return space
