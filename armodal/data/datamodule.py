"""TokenDataModule: cached token shards -> fixed-length windows -> DataLoaders."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, Subset

from armodal.data.shards import TokenShards, build_or_load_shards
from armodal.data.sources import DocumentSource
from armodal.resume import ResumableLoader
from armodal.tokenizers.space import TokenSpace


def evenly_spaced(dataset: Dataset, count: int | None) -> Dataset:
    """At most `count` items of `dataset`, evenly spaced (all of it for None or when it holds
    no more), so a capped validation still sees every part of the split."""
    n = len(dataset)
    if count is None or count >= n:
        return dataset
    return Subset(dataset, np.linspace(0, n - 1, count).round().astype(int).tolist())


def check_run_space(found: TokenSpace, trained: TokenSpace) -> None:
    """A data module rebuilt for a run must give the run's token space; a ValueError if not."""
    if found.to_dict() != trained.to_dict():
        raise ValueError(f"the run's data now gives the token space {found.to_dict()}, not the "
                         f"run's {trained.to_dict()}; the data or the tokenizer changed since "
                         f"training")


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, **kwargs: Any) -> DataLoader:
    """The DataLoader every data module uses (workers kept alive between epochs)."""
    if num_workers > 0:
        # Each new iterator draws the workers' base seed from its generator, by default torch's
        # global one; persistent workers draw once per run, so a resumed run would draw at
        # another moment than an uninterrupted one and its dropout would differ. Its own
        # generator leaves the global stream alone. (Without workers that draw happens at
        # every validation alike, resumed or not, so recipes' figures stay as they were.)
        kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                      persistent_workers=num_workers > 0, **kwargs)


def make_train_loader(dataset: Dataset, sampler: Sampler[int], batch_size: int,
                      num_workers: int, **kwargs: Any) -> ResumableLoader:
    """The training DataLoader of every data module: it resumes mid-epoch, exactly."""
    return ResumableLoader(dataset, sampler, batch_size, num_workers=num_workers,
                           persistent_workers=num_workers > 0, drop_last=True, **kwargs)


class WindowDataset(Dataset):
    """Windows of `seq_len + 1` tokens starting every `stride` tokens (default: non-overlapping).

    Item i is tokens[i*stride : i*stride + seq_len + 1] as int64; the model shifts it into
    inputs [:-1] and targets [1:]. stride=1 gives every offset, for random-offset sampling.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, stride: int | None = None, name: str = "tokens") -> None:
        if len(tokens) < seq_len + 1:
            raise ValueError(
                f"{name} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                "lower seq_len or use more data / a different val_fraction"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.stride = stride or seq_len
        self.n = (len(tokens) - seq_len - 1) // self.stride + 1

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < self.n:
            raise IndexError(f"window {i} out of range [0, {self.n})")
        start = i * self.stride
        window = self.tokens[start : start + self.seq_len + 1]
        return torch.from_numpy(window.astype(np.int64))  # (seq_len + 1,)


class TokenDataModule(L.LightningDataModule):
    """Train/val windows over shards of `source` tokenized by `tokenizer` (cached on disk).

    Call `prepare_shards()` before building the model: fitting a trainable tokenizer fixes the
    vocabulary size (`self.space.vocab_size`). Batches are (B, seq_len + 1) int64 global ids.

    train_sampling="windows": each epoch is a seeded shuffle of the non-overlapping windows.
    train_sampling="random": nanoGPT-style; each epoch draws len(windows) window start offsets
    uniformly from all positions (with replacement) from a seeded generator that advances
    every epoch. The sampler draws the offsets in the main process, so workers agree.
    val_batches caps validation to that many batches of evenly spaced windows (deterministic).
    """

    n_streams = 1  # token streams per model step

    def __init__(
        self,
        source: DocumentSource,
        tokenizer: Any,
        seq_len: int,
        batch_size: int,
        cache_dir: str = "~/.cache/armodal/shards",
        val_fraction: float = 0.1,
        split: str = "tail",
        num_workers: int = 0,
        seed: int = 0,
        val_batches: int | None = None,
        space: Any = None,
        train_sampling: str = "windows",
    ) -> None:
        super().__init__()
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if train_sampling not in ("windows", "random"):
            raise ValueError(f"train_sampling must be 'windows' or 'random', got {train_sampling!r}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.source = source
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.cache_dir = os.path.expanduser(cache_dir)
        self.val_fraction = val_fraction
        self.split = split
        self.num_workers = num_workers
        self.seed = seed
        self.val_batches = val_batches
        self.space = space
        self.train_sampling = train_sampling
        self.shards: TokenShards | None = None

    def prepare_shards(self) -> TokenShards:
        """Build or load the shards (idempotent); sets `self.shards` and `self.space`."""
        if self.shards is None:
            self.shards = build_or_load_shards(
                self.source, self.tokenizer, self.space, self.cache_dir,
                val_fraction=self.val_fraction, split=self.split, seed=self.seed,
            )
            self.space = self.shards.space
        return self.shards

    def units(self) -> tuple[float, str, None]:
        """(units per token on val, the tokenizer's unit, None: every target counts)."""
        return self.prepare_shards().units_per_token("val"), self.tokenizer.unit, None

    def run_meta(self) -> dict:
        """Nothing beyond the tokenizer and space is needed to rebuild prompts."""
        return {}

    def prepare_data(self) -> None:
        self.prepare_shards()

    def setup(self, stage: str | None = None) -> None:
        shards = self.prepare_shards()
        self.train_windows = WindowDataset(shards.train, self.seq_len, name="train split")
        if len(self.train_windows) < self.batch_size:
            raise ValueError(
                f"train split has {len(self.train_windows)} windows of seq_len {self.seq_len}, "
                f"fewer than batch_size {self.batch_size}; lower one of them or use more data"
            )
        self.val_windows = WindowDataset(shards.val, self.seq_len, name="val split")

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        if self.train_sampling == "random":
            # Every start offset is a candidate; one epoch = as many windows as "windows" mode.
            dataset = WindowDataset(self.shards.train, self.seq_len, stride=1, name="train split")
            sampler = RandomSampler(dataset, replacement=True, num_samples=len(self.train_windows), generator=gen)
            return make_train_loader(dataset, sampler, self.batch_size, self.num_workers)
        # What DataLoader(shuffle=True, generator=gen) builds, the sampler made explicit.
        sampler = RandomSampler(self.train_windows, generator=gen)
        return make_train_loader(self.train_windows, sampler, self.batch_size, self.num_workers,
                                 generator=gen)

    def val_dataloader(self) -> DataLoader:
        cap = None if self.val_batches is None else self.val_batches * self.batch_size
        return self._loader(evenly_spaced(self.val_windows, cap), shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, **kwargs)
