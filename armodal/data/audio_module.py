"""AudioDataModule: an audio source -> token sequences -> DataLoaders.

Two layouts, chosen by the tokenizer:

mu-law (one token per sample): every clip is `<bos> <boa> s_1 ... s_S <eoa> <eos>`; the clips of a
    split are concatenated and cut into windows of seq_len + 1 (like text), so seq_len is the
    model's context, not the clip length. Training windows start at random offsets each epoch.
codec (K code levels per frame): every clip is one sequence. Its codes (K, T) are laid out by
    the stream pattern (flatten / delay / parallel) between prefix and suffix columns that
    repeat each structure token across the model's streams:

        stream 0:  <bos> <boa> c0[0] c0[1] ... c0[T-1]  <pad>  ...  <eoa> <eos>
        stream 1:  <bos> <boa> <pad> c1[0] ... c1[T-2] c1[T-1] ...  <eoa> <eos>   (delay)

    Empty slots hold <pad>, which carries no loss. Batches are (B, K, L) for K model streams,
    (B, L) for one (flatten, mu-law).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.data.audio import AudioSet, AudioSource, split_audio
from armodal.data.datamodule import (
    WindowDataset,
    check_run_space,
    evenly_spaced,
    make_loader,
    make_train_loader,
)
from armodal.tokenizers.patterns import stream_pattern
from armodal.tokenizers.space import TokenSpace

AUDIO_MARKERS = {"audio": ("<boa>", "<eoa>")}
PREFIX, SUFFIX = ("<bos>", "<boa>"), ("<eoa>", "<eos>")


@dataclass(frozen=True)
class AudioLayout:
    """Where things sit in an audio sequence, shared by training, evaluation and generation.

    pattern: None for a one-stream tokenizer (mu-law), else the stream pattern of the codes."""

    space: TokenSpace
    pattern: Any

    @property
    def n_streams(self) -> int:
        return 1 if self.pattern is None else self.pattern.n_streams

    @property
    def code_offset(self) -> int:
        return self.space.offset("audio")

    def prefix(self) -> Tensor:
        """(n_streams, 2) global ids: <bos> <boa> in every stream."""
        ids = [self.space.special_ids[name] for name in PREFIX]
        return torch.tensor(ids).expand(self.n_streams, -1)

    def suffix(self) -> Tensor:
        """(n_streams, 2) global ids: <eoa> <eos> in every stream."""
        ids = [self.space.special_ids[name] for name in SUFFIX]
        return torch.tensor(ids).expand(self.n_streams, -1)

    def sequences(self, codes: Tensor) -> Tensor:
        """Codes (N, K, T) local -> (N, n_streams, L) global ids: prefix, laid-out codes
        (empty slots <pad>), suffix."""
        n = codes.shape[0]
        laid = self.pattern.apply(codes, fill=-1)  # (N, n_streams, T')
        laid = torch.where(laid >= 0, laid + self.code_offset, self.space.pad_id)
        return torch.cat([self.prefix().expand(n, -1, -1), laid,
                          self.suffix().expand(n, -1, -1)], dim=-1)

    def to_dict(self) -> dict:
        if self.pattern is None:
            return {"pattern": None}
        return {"pattern": self.pattern.kind, "n_levels": self.pattern.n_levels,
                "codebook_size": self.pattern.codebook_size}

    @classmethod
    def for_run(cls, space: TokenSpace, meta: dict, tokenizer: Any) -> AudioLayout:
        """The layout a run was trained with; refuses a codec whose K or codebook size is not
        the one the model's streams and vocabulary were built for."""
        audio = meta.get("audio") or {}
        if audio.get("pattern") is None:
            return cls(space, None)
        trained = (audio["n_levels"], audio["codebook_size"])
        found = (getattr(tokenizer, "n_levels", 1), getattr(tokenizer, "codebook_size", None))
        if found != trained:
            raise ValueError(f"the run was trained on codes of K={trained[0]} levels of "
                             f"{trained[1]} codes, but its codec gives K={found[0]} levels of "
                             f"{found[1]}; point domain.tokenizer.codec (and n_q) at the "
                             f"codec the run was trained with")
        return cls(space, stream_pattern(audio["pattern"], *trained))


def audio_layout(tokenizer: Any, pattern: str) -> AudioLayout:
    """The token space and layout of an audio model under `tokenizer` and `pattern`."""
    if not hasattr(tokenizer, "codebook_size"):  # one token per sample: no levels to lay out
        space = TokenSpace({"audio": tokenizer.vocab_size}, AUDIO_MARKERS)
        return AudioLayout(space, None)
    laid = stream_pattern(pattern, tokenizer.n_levels, tokenizer.codebook_size)
    return AudioLayout(TokenSpace({"audio": laid.vocab_size}, AUDIO_MARKERS), laid)


def mulaw_stream(layout: AudioLayout, tokens: Tensor) -> Tensor:
    """(N, S) local sample tokens -> (N * (S + 4),) global ids, clip after clip."""
    n = tokens.shape[0]
    return torch.cat([layout.prefix()[0].expand(n, -1), tokens + layout.code_offset,
                      layout.suffix()[0].expand(n, -1)], dim=1).flatten()


class AudioDataModule(L.LightningDataModule):
    """Train/val sequences from `audio` under `tokenizer` (mu-law or codec codes).

    Call `prepare_shards()` before building the model (as with TokenDataModule): it loads and
    splits the clips and fixes the TokenSpace. `seq_len` is the context of a mu-law model (its
    windows); a codec model's context is a whole clip's sequence and seq_len must be null.
    """

    def __init__(self, audio: AudioSource, tokenizer: Any, batch_size: int,
                 seq_len: int | None = None, pattern: str = "delay", val_fraction: float = 0.1,
                 split: str = "tail", num_workers: int = 0, seed: int = 0,
                 val_batches: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.audio, self.tokenizer, self.batch_size = audio, tokenizer, batch_size
        self.val_fraction, self.split = val_fraction, split
        self.num_workers, self.seed, self.val_batches = num_workers, seed, val_batches
        self.layout = audio_layout(tokenizer, pattern)
        self.space = self.layout.space
        if self.layout.pattern is None and (seq_len is None or seq_len < 1):
            raise ValueError(f"a mu-law audio model needs seq_len (its context in samples) "
                             f">= 1, got {seq_len}")
        if self.layout.pattern is not None and seq_len is not None:
            raise ValueError(f"seq_len={seq_len}: a codec audio model sees whole clips, so its "
                             f"context follows from the clip length; set domain.data.seq_len="
                             f"null and choose the clip length in domain.audio.clip_seconds")
        self._seq_len = seq_len
        self.train_audio: AudioSet | None = None
        self.train_sequences: Tensor | None = None  # built by setup()

    @classmethod
    def for_run(cls, train_config: dict, tokenizer: Any, space: TokenSpace) -> AudioDataModule:
        """The data module a run was trained on, rebuilt from its config with its tokenizer."""
        from armodal.checkpoint import instantiate_from_run

        audio = instantiate_from_run(train_config["domain"]["audio"], "domain.audio")
        dm = cls(audio, tokenizer, seed=train_config["seed"], **train_config["domain"]["data"])
        check_run_space(dm.space, space)
        return dm

    def prepare_shards(self) -> AudioLayout:
        """Load, check and split the clips, tokenize val (idempotent)."""
        if self.train_audio is not None:
            return self.layout
        data = self.audio.load()
        if data.sample_rate != self.tokenizer.sample_rate:
            raise ValueError(f"{data.name} is at {data.sample_rate} Hz but the tokenizer takes "
                             f"{self.tokenizer.sample_rate} Hz; set the source's sample_rate "
                             f"to {self.tokenizer.sample_rate} (sources resample on load)")
        self.train_audio, self.val_audio = split_audio(data, self.val_fraction, self.split,
                                                       self.seed)
        self.val_sequences = self._tokenize(self.val_audio, windows=True)  # (N, [K,] L)
        return self.layout

    def _tokenize(self, data: AudioSet, windows: bool = False) -> Tensor:
        """mu-law: one flat (N * (S + 4),) stream, or with `windows` its non-overlapping
        (W, seq_len + 1) windows (each target once); codec: (N, n_streams, L) or (N, L)."""
        codes = self.tokenizer.encode_batch(data.clips)
        if self.layout.pattern is None:
            stream = mulaw_stream(self.layout, codes)
            if not windows:
                return stream
            if len(stream) < self._seq_len + 1:
                raise ValueError(f"the val split holds {len(stream)} tokens, fewer than "
                                 f"seq_len + 1 = {self._seq_len + 1}")
            return stream.unfold(0, self._seq_len + 1, self._seq_len)
        sequences = self.layout.sequences(codes)  # (N, n_streams, L)
        return sequences[:, 0] if self.layout.n_streams == 1 else sequences

    @property
    def seq_len(self) -> int:
        """The model's context: a mu-law window, or a whole codec sequence but its last token."""
        if self._seq_len is not None:
            return self._seq_len
        self.prepare_shards()
        return self.val_sequences.shape[-1] - 1

    def units(self) -> tuple[float, str, tuple[int, int]]:
        """Bits per sample (mu-law) or per code (codec) over the audio ids only."""
        lo = self.layout.code_offset
        unit = "sample" if self.layout.pattern is None else "code"
        return 1.0, unit, (lo, lo + self.space.modalities["audio"])

    @property
    def n_streams(self) -> int:
        """Token streams per model step: K under the delay / parallel patterns, else 1."""
        return self.layout.n_streams

    def run_meta(self) -> dict:
        self.prepare_shards()
        return {"audio": {**self.layout.to_dict(), "sample_rate": self.tokenizer.sample_rate,
                          "clip_seconds": self.val_audio.seconds}}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_shards()
        if self.train_sequences is None:
            self.train_sequences = self._tokenize(self.train_audio)
        if self.layout.pattern is None:
            self.train_set: Dataset = WindowDataset(self.train_sequences.numpy(), self._seq_len,
                                                    stride=1, name="train split")
            n_train = (len(self.train_sequences) - 1) // self._seq_len
        else:
            self.train_set = self.train_sequences
            n_train = len(self.train_sequences)
        if n_train < self.batch_size:
            raise ValueError(f"train split has {n_train} sequences, fewer than batch_size "
                             f"{self.batch_size}")
        self._epoch_size = n_train

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        # mu-law: every sample offset is a window start; an epoch is as many windows as fit.
        sampler = RandomSampler(self.train_set, replacement=self.layout.pattern is None,
                                num_samples=self._epoch_size, generator=gen)
        return make_train_loader(self.train_set, sampler, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        cap = None if self.val_batches is None else self.val_batches * self.batch_size
        return self._loader(evenly_spaced(self.val_sequences, cap), shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, **kwargs)
