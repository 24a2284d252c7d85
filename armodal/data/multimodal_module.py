"""MultimodalDataModule: several segment sources, tokenized into one space, mixed by ratio.

Every sample becomes  <bos> segment ... segment <eos>  right-padded with <pad> to the longest
sequence (pads carry no loss). Training draws from the sources by `ratio`: an epoch of
`epoch_size` sequences holds round(ratio * epoch_size) from each, cycling through a seeded
permutation of a source when it is smaller than its share. A source may drop its first
segment's content with probability `cond_dropout` (the condition of a text -> image pair), so
one model learns p(image | caption) and p(image) for classifier-free guidance. Val is every
source's val split, unmixed and undropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.data.datamodule import make_loader, make_train_loader
from armodal.tokenizers.multimodal import MultimodalTokenizer
from armodal.tokenizers.space import TokenSpace

__all__ = ["MixturePart", "MixtureDataset", "MultimodalDataModule", "pad_rows"]


@dataclass
class MixturePart:
    """One source of a mixture: `source.split_samples()`, its share, its condition dropout."""

    source: Any
    ratio: float = 1.0
    cond_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.ratio, (int, float)) and self.ratio > 0):
            raise ValueError(f"mixture ratio must be > 0, got {self.ratio!r}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout!r}")


def pad_rows(rows: list[Tensor], length: int, pad_id: int) -> Tensor:
    """(N, length) int64: each (T_i,) row right-padded with pad_id."""
    out = torch.full((len(rows), length), pad_id, dtype=torch.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


class MixtureDataset(Dataset):
    """Item i of a fixed, seeded table of (part, row) picks; a picked row is its unconditional
    twin with probability cond_dropout[part] (a per-item draw from torch's global RNG, which the
    resumable loader seeds per item, so any num_workers and a resume give the same items)."""

    def __init__(self, parts: list[Tensor], uncond: list[Tensor | None], ratios: list[float],
                 cond_dropout: list[float], epoch_size: int, seed: int) -> None:
        total = sum(ratios)
        counts = [round(r / total * epoch_size) for r in ratios]
        g = torch.Generator().manual_seed(seed)
        table = []
        for k, (rows, n) in enumerate(zip(parts, counts)):
            reps = -(-n // len(rows))  # ceil: cycle through a permutation per pass
            picks = torch.cat([torch.randperm(len(rows), generator=g) for _ in range(reps)])[:n]
            table.append(torch.stack([torch.full_like(picks, k), picks], 1))
        self.table = torch.cat(table)  # (epoch_size, 2): part, row
        self.parts, self.uncond, self.cond_dropout = parts, uncond, cond_dropout
        self.random_items = any(p > 0 for p in cond_dropout)

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> Tensor:
        k, row = self.table[i].tolist()
        if self.cond_dropout[k] > 0 and torch.rand(()) < self.cond_dropout[k]:
            return self.uncond[k][row]
        return self.parts[k][row]


class MultimodalDataModule(L.LightningDataModule):
    """Train/val sequences of mixed-modality samples. Call `prepare_shards()` first (it fits a
    trainable part on the train samples and fixes the TokenSpace). Batches: (B, L) int64."""

    n_streams = 1

    def __init__(self, mixture: Mapping[str, MixturePart | Mapping], tokenizer: MultimodalTokenizer,
                 batch_size: int, epoch_size: int | None = None, num_workers: int = 0,
                 seed: int = 0, val_batches: int | None = None,
                 loss_weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not isinstance(tokenizer, MultimodalTokenizer):
            raise ValueError(f"a mixture domain needs a MultimodalTokenizer, got "
                             f"{type(tokenizer).__name__}")
        if not mixture:
            raise ValueError("mixture needs at least one part")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.parts = {name: p if isinstance(p, MixturePart) else MixturePart(**p)
                      for name, p in mixture.items()}
        self.tokenizer, self.batch_size, self.epoch_size = tokenizer, batch_size, epoch_size
        self.num_workers, self.seed, self.val_batches = num_workers, seed, val_batches
        self.loss_weights = dict(loss_weights or {})
        self.space: TokenSpace | None = None

    def prepare_shards(self) -> TokenSpace:
        """Load, fit and tokenize every part (idempotent); sets `space` and the splits."""
        if self.space is not None:
            return self.space
        splits = {name: p.source.split_samples() for name, p in self.parts.items()}
        for name, (train, val) in splits.items():
            if not train or not val:
                raise ValueError(f"mixture part {name!r} has {len(train)} train and {len(val)} "
                                 f"val samples; each needs at least one")
        if not self.tokenizer.is_fitted:
            self.tokenizer.fit(s for train, _ in splits.values() for s in train)
        self.space = self.tokenizer.space
        # One encode over every part and split, so content two parts share (the same image or
        # clip in both reading orders) is encoded once.
        every = iter(self._encode([s for train, val in splits.values() for s in train + val]))
        encoded = {}
        for name, (train, val) in splits.items():
            rows = [next(every) for _ in train]
            uncond = [self._drop_first(row) for row in rows] \
                if self.parts[name].cond_dropout > 0 else None
            encoded[name] = (rows, [next(every) for _ in val], uncond)
        self.length = max(len(r) for tr, va, _ in encoded.values() for r in tr + va)
        pad = self.space.pad_id
        self.train_parts = {n: pad_rows(tr, self.length, pad) for n, (tr, _, _) in encoded.items()}
        self.uncond_parts = {n: pad_rows(un, self.length, pad) if un is not None else None
                             for n, (_, _, un) in encoded.items()}
        self.val_parts = {n: pad_rows(va, self.length, pad) for n, (_, va, _) in encoded.items()}
        self.val_samples = {n: val for n, (_, val) in splits.items()}
        return self.space

    def _encode(self, samples: list[list]) -> list[Tensor]:
        """(T,) <bos> segments <eos> per sample."""
        s = self.space
        bos, eos = torch.tensor([s.bos_id]), torch.tensor([s.eos_id])
        return [torch.cat([bos, body, eos]) for body in self.tokenizer.encode_many(samples)]

    def _drop_first(self, row: Tensor) -> Tensor:
        """The unconditional twin of an encoded pair: its first segment emptied, the markers
        kept (<bos> <bo{m}> <eo{m}> rest...), cut from the row rather than encoded again."""
        modality = self.tokenizer.space.split(row[:2])[0][0]  # the segment <bos> opens
        end = self.tokenizer.markers(modality)[1]
        close = int((row == end).nonzero()[0])  # content ids never equal a marker's
        return torch.cat([row[:2], row[close:]])

    @property
    def seq_len(self) -> int:
        """Model context: the longest sequence but its last token."""
        self.prepare_shards()
        return self.length - 1

    def units(self) -> tuple[float, str, None]:
        """Bits are reported per token overall; per modality by ModalityGroups."""
        return 1.0, "token", None

    def modality_units(self) -> dict[str, tuple[str, float]]:
        """Per modality, the unit its bits are reported in and how many a token stands for."""
        out = {}
        for m, tok in self.tokenizer.parts.items():
            per = getattr(tok, "dims_per_code", 1.0) if m == "image" else 1.0
            out[m] = (getattr(tok, "unit", "token"), float(per))
        return out

    def run_meta(self) -> dict:
        self.prepare_shards()
        return {"multimodal": {"parts": list(self.parts), "seq_len": self.length}}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_shards()
        names = list(self.parts)
        epoch = self.epoch_size or sum(len(self.train_parts[n]) for n in names)
        self.train_set = MixtureDataset(
            [self.train_parts[n] for n in names], [self.uncond_parts[n] for n in names],
            [self.parts[n].ratio for n in names], [self.parts[n].cond_dropout for n in names],
            epoch, self.seed)
        if len(self.train_set) < self.batch_size:
            raise ValueError(f"an epoch holds {len(self.train_set)} sequences, fewer than "
                             f"batch_size {self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        return make_train_loader(self.train_set, RandomSampler(self.train_set, generator=gen),
                                 self.batch_size, self.num_workers, generator=gen)

    def val_dataloader(self) -> DataLoader:
        parts = list(self.val_parts.values())
        if self.val_batches is not None:  # an equal share of each part, not the first part only
            share = max(1, self.val_batches * self.batch_size // len(parts))
            parts = [rows[:share] for rows in parts]
        rows = torch.cat(parts)  # (N, L)
        return make_loader(rows, self.batch_size, self.num_workers, shuffle=False,
                           drop_last=False)
