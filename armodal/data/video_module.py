"""VideoDataModule: a clip source -> frames tokenized one by one -> clip sequences -> loaders.

Every clip is one sequence of fixed length L, frame-major, each frame in raster order:

    <bos> <bof> frame 1 codes <eof> <bof> frame 2 codes <eof> ... <eof> <eos>

A frame's codes are exactly what the image tokenizer writes for that frame alone (VQ patch
codes or pixels, on its GridLayout), so any image tokenizer serves, and decoding a generated
clip is splitting it at the frame markers and decoding each frame as an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.data.datamodule import check_run_space, make_loader, make_train_loader
from armodal.data.image_module import image_units
from armodal.data.images import split_images
from armodal.data.video import ClipSet, MovingDigits
from armodal.tokenizers.space import TokenSpace

FRAME_MARKERS = {"image": ("<bof>", "<eof>")}


@dataclass(frozen=True)
class VideoLayout:
    """Where things sit in a clip sequence, shared by training, evaluation and generation.

    frames: frames per training clip; frame_steps: the tokenizer's per-frame stream
    (GridLayout.steps(): None where a code goes, else the forced local id, e.g. end of row).
    """

    space: TokenSpace
    frames: int
    frame_steps: tuple[int | None, ...]
    n_codes: int

    @property
    def frame_len(self) -> int:
        """Tokens per frame in the sequence, markers included."""
        return len(self.frame_steps) + 2

    def pack(self, streams: Tensor) -> Tensor:
        """(N, F', S) local ids of each frame -> (N, 1 + F' * (S + 2)) global ids:
        <bos> then <bof> codes <eof> per frame (no <eos>: a prompt goes on from here)."""
        s = self.space
        n, f, _ = streams.shape
        bof = torch.full((n, f, 1), s.special_ids["<bof>"])
        eof = torch.full((n, f, 1), s.special_ids["<eof>"])
        framed = torch.cat([bof, streams + s.offset("image"), eof], -1)  # (N, F', S + 2)
        return torch.cat([torch.full((n, 1), s.bos_id), framed.reshape(n, -1)], 1)

    def sequences(self, streams: Tensor) -> Tensor:
        """(N, F, S) local ids -> (N, L) whole training sequences, <eos> last."""
        packed = self.pack(streams)
        return torch.cat([packed, torch.full((len(packed), 1), self.space.eos_id)], 1)

    def frame_streams(self, ids: Tensor | list[int], frames: int | None = None) -> Tensor:
        """(F', S) local ids of every frame in a global id sequence (the inverse of `pack`);
        ValueError naming the frame that is cut short or holds a foreign token."""
        segments = self.space.split(ids)
        if frames is not None and len(segments) != frames:
            raise ValueError(f"expected {frames} frames between <bof> / <eof> markers, found "
                             f"{len(segments)}")
        for k, (modality, local) in enumerate(segments):
            if modality != "image" or len(local) != len(self.frame_steps):
                raise ValueError(f"frame {k} holds {len(local)} {modality} tokens; a frame is "
                                 f"{len(self.frame_steps)} image tokens")
        return torch.stack([local for _, local in segments]) if segments else \
            torch.zeros(0, len(self.frame_steps), dtype=torch.int64)

    def frame_masks(self, frames: int) -> Tensor:
        """(frames * frame_len, V) bool step masks: per frame <bof>, then at each position a
        code of the tokenizer (or its forced token), then <eof>. With them any model, trained
        or not, emits exactly `frames` well-formed frames."""
        lo = self.space.offset("image")
        steps = ["<bof>"] + ["image" if s is None else lo + s for s in self.frame_steps] + \
            ["<eof>"]
        one = self.space.layout_masks(steps)  # (frame_len, V)
        # "image" allows the modality's whole range; a code position takes codes only, never
        # the tokenizer's end-of-row or size ids.
        code_rows = torch.tensor([s == "image" for s in steps])
        one[code_rows, lo + self.n_codes:] = False
        return one.repeat(frames, 1)

    def to_dict(self) -> dict:
        return {"frames": self.frames}

    @classmethod
    def for_run(cls, space: TokenSpace, meta: dict, tokenizer: Any) -> VideoLayout:
        return cls(space, int(meta["video"]["frames"]), tuple(tokenizer.layout.steps()),
                   tokenizer.layout.n_codes)


def video_space(tokenizer: Any) -> TokenSpace:
    """The token space of a video model: the image tokenizer's ids between frame markers."""
    return TokenSpace({"image": tokenizer.vocab_size}, FRAME_MARKERS)


def tokenize_clips(tokenizer: Any, clips: ClipSet) -> Tensor:
    """(N, F, S) int64 local ids: every frame through the image tokenizer in one batch."""
    n, f = clips.frames.shape[:2]
    flat = clips.frames.reshape(n * f, *clips.frames.shape[2:])  # (N * F, C, H, W)
    return tokenizer.encode_batch(flat).reshape(n, f, -1)


class VideoDataModule(L.LightningDataModule):
    """Train/val clip sequences from `video` (a MovingDigits source) under an image tokenizer.

    The source images are split first (val_fraction, "tail": the last images), then each split
    draws its own clips, so held-out clips move held-out digits. Call `prepare_shards()` before
    building the model: it fixes the TokenSpace. Batches are (B, L) int64 global ids.
    """

    n_streams = 1  # token streams per model step

    def __init__(self, video: MovingDigits, tokenizer: Any, batch_size: int,
                 val_fraction: float = 0.1, split: str = "tail", num_workers: int = 0,
                 seed: int = 0, val_batches: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.video, self.tokenizer, self.batch_size = video, tokenizer, batch_size
        self.val_fraction, self.split, self.num_workers = val_fraction, split, num_workers
        self.seed, self.val_batches = seed, val_batches
        self.layout: VideoLayout | None = None
        self.space: TokenSpace | None = None
        self.train_sequences: Tensor | None = None  # (N, L), built by setup()

    @classmethod
    def for_run(cls, train_config: dict, tokenizer: Any, space: TokenSpace) -> VideoDataModule:
        """The data module a run was trained on, rebuilt from its config with its tokenizer."""
        from armodal.checkpoint import instantiate_from_run

        video = instantiate_from_run(train_config["domain"]["video"], "domain.video")
        dm = cls(video, tokenizer, seed=train_config["seed"], **train_config["domain"]["data"])
        check_run_space(dm.prepare_shards().space, space)
        return dm

    def prepare_shards(self) -> VideoLayout:
        """Load and split the images, draw and tokenize the val clips (idempotent); sets
        `space`, `layout`, `val_clips` and `val_sequences`."""
        if self.layout is not None:
            return self.layout
        size = tuple(getattr(self.tokenizer, "image_size", ()))
        if size != (self.video.canvas, self.video.canvas):
            raise ValueError(f"the clips' frames are {self.video.canvas}x{self.video.canvas} "
                             f"(domain.video.canvas) but the tokenizer reads "
                             f"{'x'.join(map(str, size)) or 'no fixed size'} images; make them "
                             f"equal")
        images = self.video.load_images()
        self.train_images, self.val_images = split_images(images, self.val_fraction,
                                                          self.split, self.seed)
        if not getattr(self.tokenizer, "is_fitted", True):
            self.tokenizer.fit(self.train_images.images)
        self.space = video_space(self.tokenizer)
        grid = self.tokenizer.layout
        self.layout = VideoLayout(self.space, self.video.frames, tuple(grid.steps()),
                                  grid.n_codes)
        # Only val is tokenized here: eval and generation rebuild the module for it alone;
        # training tokenizes the train clips in setup().
        self.val_clips = self.video.clips(self.val_images, "val")
        self.val_sequences = self.layout.sequences(tokenize_clips(self.tokenizer,
                                                                  self.val_clips))
        return self.layout

    @property
    def seq_len(self) -> int:
        """Model context: a whole clip sequence but its last token (the last target)."""
        self.prepare_shards()
        return self.val_sequences.shape[1] - 1

    def units(self) -> tuple[float, str, tuple[int, int]]:
        return image_units(self.tokenizer, self.prepare_shards().space)

    def run_meta(self) -> dict:
        """What a run directory needs to rebuild prompts: `{"video": VideoLayout.to_dict()}`."""
        return {"video": self.prepare_shards().to_dict()}

    def setup(self, stage: str | None = None) -> None:
        layout = self.prepare_shards()
        if self.train_sequences is None:
            clips = self.video.clips(self.train_images, "train")
            self.train_sequences = layout.sequences(tokenize_clips(self.tokenizer, clips))
        if len(self.train_sequences) < self.batch_size:
            raise ValueError(f"train split has {len(self.train_sequences)} clips, fewer than "
                             f"batch_size {self.batch_size}")

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        # What DataLoader(shuffle=True, generator=gen) builds, the sampler made explicit.
        sequences = self.train_sequences  # (N, L)
        return make_train_loader(sequences, RandomSampler(sequences, generator=gen),
                                 self.batch_size, self.num_workers, generator=gen)

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_sequences  # (N, L)
        if self.val_batches is not None:
            dataset = dataset[:self.val_batches * self.batch_size]
        return self._loader(dataset, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, **kwargs)
