"""ImageDataModule: an image source -> tokenized image sequences -> DataLoaders.

Every image is one sequence of fixed length L:

    <bos> [class] <boi> [H W] code ... code [<eor>] ... <eoi> <eos>

The class token (conditional models) comes from a "label" modality of n_classes + 1 ids, the
last being the null class that condition dropout substitutes during training and that
classifier-free guidance decodes from at sampling time. Images tokenize in one vectorized
pass (a VQ codec: batched encoder forwards), so sequences are rebuilt in memory per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.data.datamodule import check_run_space, make_loader, make_train_loader
from armodal.data.images import ImageSet, ImageSource, split_images
from armodal.tokenizers.space import TokenSpace

IMAGE_MARKERS = {"image": ("<boi>", "<eoi>")}


@dataclass(frozen=True)
class ImageLayout:
    """Where things sit in an image sequence, shared by training, evaluation and generation."""

    space: TokenSpace
    conditional: bool
    classes: list[str] | None

    @property
    def null_label(self) -> int:
        """Local id of the null class (no condition)."""
        return len(self.classes or [])

    def prefix(self, label: int | None) -> list[int]:
        """Global ids before the image codes: <bos> [class or null class] <boi>."""
        s = self.space
        head = [s.bos_id]
        if self.conditional:
            if label is not None and not 0 <= label < self.null_label:
                raise ValueError(f"class id {label} is outside the trained classes [0, "
                                 f"{self.null_label}) ({', '.join(self.classes or [])})")
            head.append(s.offset("label") + (self.null_label if label is None else label))
        elif label is not None:
            raise ValueError(f"class {label} requested from an unconditional model; it was "
                             f"trained without class tokens")
        return head + [s.special_ids["<boi>"]]

    def to_dict(self) -> dict:
        return {"conditional": self.conditional, "classes": self.classes}

    @classmethod
    def for_run(cls, space: TokenSpace, meta: dict) -> ImageLayout:
        image = meta.get("image") or {}
        return cls(space, bool(image.get("conditional")), image.get("classes"))


def image_space(tokenizer: Any, classes: list[str] | None) -> TokenSpace:
    """The token space of an image model: a label modality first when conditional."""
    modalities = {"label": len(classes) + 1} if classes else {}
    return TokenSpace({**modalities, "image": tokenizer.vocab_size}, IMAGE_MARKERS)


def image_units(tokenizer: Any, space: TokenSpace) -> tuple[float, str, tuple[int, int]]:
    """(dims per code token, "dim", the code tokens' global id range): bits per dim are over
    the image codes alone, not markers or labels (image and video runs alike)."""
    lo = space.offset("image")
    return float(tokenizer.dims_per_code), "dim", (lo, lo + tokenizer.layout.n_codes)


def image_sequences(layout: ImageLayout, tokenizer: Any, data: ImageSet) -> Tensor:
    """(N, L) int64 global ids: each image's prefix, codes, <eoi>, <eos>."""
    s = layout.space
    codes = tokenizer.encode_batch(data.images) + s.offset("image")  # (N, S)
    labels = data.labels.tolist() if layout.conditional else [None] * len(data)
    prefix = torch.tensor([layout.prefix(y) for y in labels])  # (N, 2 or 3)
    tail = torch.tensor([s.special_ids["<eoi>"], s.eos_id]).expand(len(data), 2)
    return torch.cat([prefix, codes, tail], 1)


class ConditionDropout(Dataset):
    """Image sequences; in training each class token becomes the null class with probability p,
    so one model learns p(x | class) and p(x) (classifier-free guidance needs both).

    The draw comes from torch's global RNG: a ResumableLoader seeds it per item (random_items),
    so the dropped labels are the same with any num_workers and after a resume."""

    def __init__(self, sequences: Tensor, p: float, label_pos: int | None,
                 null_id: int) -> None:
        self.sequences, self.p, self.label_pos, self.null_id = sequences, p, label_pos, null_id
        self.random_items = label_pos is not None and p > 0  # else nothing random to seed

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> Tensor:
        seq = self.sequences[i]  # (L,)
        if not self.random_items:  # unconditional, or no dropout
            return seq
        if torch.rand(()) < self.p:
            seq = seq.clone()
            seq[self.label_pos] = self.null_id
        return seq


class ImageDataModule(L.LightningDataModule):
    """Train/val image sequences from `images` under `tokenizer`.

    Call `prepare_shards()` before building the model (as with TokenDataModule): it loads and
    splits the images, fits a trainable tokenizer (a palette) on the train split and fixes the
    TokenSpace. Batches are (B, L) int64 global ids.
    """

    n_streams = 1  # token streams per model step

    def __init__(self, images: ImageSource, tokenizer: Any, batch_size: int,
                 val_fraction: float = 0.2, split: str = "random", conditional: bool = False,
                 cond_dropout: float = 0.1, num_workers: int = 0, seed: int = 0,
                 val_batches: int | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {cond_dropout}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.images, self.tokenizer, self.batch_size = images, tokenizer, batch_size
        self.val_fraction, self.split, self.conditional = val_fraction, split, conditional
        self.cond_dropout, self.num_workers, self.seed = cond_dropout, num_workers, seed
        self.val_batches = val_batches
        self.layout: ImageLayout | None = None
        self.space: TokenSpace | None = None
        self.train_sequences: Tensor | None = None  # (N, L), built by setup()

    @classmethod
    def for_run(cls, train_config: dict, tokenizer: Any, space: TokenSpace) -> ImageDataModule:
        """The data module a run was trained on, rebuilt from its config with its tokenizer."""
        from armodal.checkpoint import instantiate_from_run

        images = instantiate_from_run(train_config["domain"]["images"], "domain.images")
        dm = cls(images, tokenizer, seed=train_config["seed"],
                 **train_config["domain"]["data"])
        check_run_space(dm.prepare_shards().space, space)
        return dm

    def prepare_shards(self) -> ImageLayout:
        """Load, split, fit and tokenize (idempotent); sets `space`, `layout` and the splits."""
        if self.layout is not None:
            return self.layout
        data = self.images.load()
        if self.conditional and (data.labels is None or not data.classes):
            raise ValueError(f"conditional=True needs class labels, and {data.name} has none; "
                             f"set domain.data.conditional=false")
        train, val = split_images(data, self.val_fraction, self.split, self.seed)
        if not getattr(self.tokenizer, "is_fitted", True):
            self.tokenizer.fit(train.images)
        classes = list(data.classes) if self.conditional else None
        self.space = image_space(self.tokenizer, classes)
        self.layout = ImageLayout(self.space, self.conditional, classes)
        # Only val is tokenized here: eval and completion rebuild the module for it alone;
        # training tokenizes the train split in setup().
        self.val_sequences = image_sequences(self.layout, self.tokenizer, val)
        self.train_images, self.val_images = train, val
        return self.layout

    @property
    def seq_len(self) -> int:
        """Model context: a whole image sequence but its last token (the last target)."""
        self.prepare_shards()
        return self.val_sequences.shape[1] - 1

    def units(self) -> tuple[float, str, tuple[int, int]]:
        return image_units(self.tokenizer, self.prepare_shards().space)

    def run_meta(self) -> dict:
        """What a run directory needs to rebuild prompts: `{"image": ImageLayout.to_dict()}`."""
        return {"image": self.prepare_shards().to_dict()}

    def setup(self, stage: str | None = None) -> None:
        layout = self.prepare_shards()
        if self.train_sequences is None:
            self.train_sequences = image_sequences(layout, self.tokenizer, self.train_images)
        if len(self.train_sequences) < self.batch_size:
            raise ValueError(f"train split has {len(self.train_sequences)} images, fewer than "
                             f"batch_size {self.batch_size}")
        label_pos = 1 if layout.conditional else None
        null_id = layout.prefix(None)[1] if layout.conditional else -1
        self.train_set = ConditionDropout(self.train_sequences, self.cond_dropout, label_pos,
                                          null_id)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        # What DataLoader(shuffle=True, generator=gen) builds, the sampler made explicit.
        return make_train_loader(self.train_set, RandomSampler(self.train_set, generator=gen),
                                 self.batch_size, self.num_workers, generator=gen)

    def val_dataloader(self) -> DataLoader:
        dataset = self.val_sequences  # (N, L): every image with its true class
        if self.val_batches is not None:
            dataset = dataset[:self.val_batches * self.batch_size]
        return self._loader(dataset, shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, **kwargs)
