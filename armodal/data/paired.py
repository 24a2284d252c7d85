"""Paired multimodal sources: samples that are lists of (modality, content) segments.

A source gives its train and val samples (`split_samples`); the multimodal data module
tokenizes them with a MultimodalTokenizer and mixes several sources by ratio. The two orders
of a pair are two sources over the same split, so one model learns both directions (image ->
caption and caption -> image).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from armodal.data.images import ImageSet, ImageSource, split_images

__all__ = ["SegmentSource", "DigitCaptions", "SpeechTranscripts", "TextSamples", "DIGIT_WORDS",
           "caption_digit", "ORDERS"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_TEMPLATES = ("a handwritten {word}", "the digit {word}", "a handwritten {digit}",
                     "a picture of a {word}")
ORDERS = ("image_text", "text_image", "image")


class SegmentSource(Protocol):
    """Anything that gives multimodal samples, already split into train and val."""

    def split_samples(self) -> tuple[list[list[tuple[str, Any]]], list[list[tuple[str, Any]]]]:
        """(train samples, val samples); a sample is a list of (modality, content) segments."""
        ...


def caption_digit(caption: str) -> int | None:
    """The digit a caption names (by word or numeral), or None when it names none or several."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    named = {DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS}
    named |= {int(w) for w in words if len(w) == 1 and w.isdigit()}
    return named.pop() if len(named) == 1 else None


@dataclass
class DigitCaptions:
    """Digit images with text captions ("a handwritten seven"), in one reading order.

    order: "image_text" (captioning), "text_image" (caption -> image), or "image" (the image
    alone: an unpaired, single-modality share of a mixture). Captions come from `templates`,
    one per image chosen by its index, so both orders see the same caption for an image.
    Split as the image domains split: `val_fraction` held out, "tail" = the last images.
    """

    images: ImageSource
    order: str = "image_text"
    val_fraction: float = 0.1
    split: str = "tail"
    seed: int = 0
    templates: tuple[str, ...] = CAPTION_TEMPLATES

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"order={self.order!r}; allowed: {', '.join(ORDERS)}")
        self.templates = tuple(self.templates)
        if not self.templates:
            raise ValueError("templates must hold at least one caption template")
        for t in self.templates:
            if "{word}" not in t and "{digit}" not in t:
                raise ValueError(f"caption template {t!r} names no digit: use {{word}} "
                                 f"(seven) or {{digit}} (7)")

    def split_sets(self) -> tuple[ImageSet, ImageSet]:
        data = self.images.load()
        if data.labels is None:
            raise ValueError(f"{data.name} has no labels; captions need the digit of each image")
        return split_images(data, self.val_fraction, self.split, self.seed)

    def caption(self, label: int, index: int) -> str:
        template = self.templates[index % len(self.templates)]
        return template.format(word=DIGIT_WORDS[label], digit=label)

    def samples(self, data: ImageSet, first_index: int = 0) -> list[list[tuple[str, Any]]]:
        out = []
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist())):
            text = ("text", self.caption(label, first_index + i))
            picture = ("image", image)
            out.append({"image_text": [picture, text], "text_image": [text, picture],
                        "image": [picture]}[self.order])
        return out

    def split_samples(self) -> tuple[list[list[tuple[str, Any]]], list[list[tuple[str, Any]]]]:
        train, val = self.split_sets()
        return self.samples(train), self.samples(val, first_index=len(train))


@dataclass
class TextSamples:
    """Plain text documents cut into chunks of at most `chars` characters: a text-only share
    of a mixture (keeps a captioner's language from narrowing to its captions)."""

    source: Any  # an armodal DocumentSource: .documents() yields (name, text)
    chars: int = 64
    val_fraction: float = 0.1
    max_chunks: int | None = None

    def split_samples(self) -> tuple[list[list[tuple[str, Any]]], list[list[tuple[str, Any]]]]:
        text = "".join(doc for _, doc in self.source.documents())
        chunks = [text[i: i + self.chars] for i in range(0, len(text), self.chars)]
        chunks = [c for c in chunks if c.strip()][: self.max_chunks]
        n_val = max(1, int(len(chunks) * self.val_fraction))
        g = torch.Generator().manual_seed(0)
        order = torch.randperm(len(chunks), generator=g).tolist()
        pick = [[("text", chunks[i])] for i in order]
        return pick[n_val:], pick[:n_val]


@dataclass
class SpeechTranscripts:
    """Spoken utterances with their transcripts: `corpus` is a SpeechCorpus (espeak-ng).

    order: "audio_text" (speech -> text), "text_audio" (text -> speech) or "audio" (speech
    alone). Each utterance is one whole segment, trailing silence trimmed (a quiet tail past
    the last sample above `silence` of the peak, kept to `tail_seconds`). The last
    `val_fraction` of the utterances are held out, whole.
    """

    corpus: Any
    order: str = "audio_text"
    val_fraction: float = 0.1
    silence: float = 0.02
    tail_seconds: float = 0.05

    def __post_init__(self) -> None:
        if self.order not in ("audio_text", "text_audio", "audio"):
            raise ValueError(f"order={self.order!r}; allowed: audio_text, text_audio, audio")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    def utterances(self) -> tuple[list[torch.Tensor], list[str]]:
        """Every utterance's (S_i,) wave at the corpus' sample rate, trimmed, and its text."""
        rate = self.corpus.sample_rate
        waves, texts = _read_corpus(str(self.corpus.directory()), rate)
        tail = int(self.tail_seconds * rate)
        trimmed = []
        for wave in waves:
            loud = (wave.abs() > self.silence * wave.abs().max().clamp(min=1e-8)).nonzero()
            end = int(loud[-1]) + 1 + tail if len(loud) else len(wave)
            trimmed.append(wave[:end].contiguous())
        return trimmed, list(texts)

    def split_samples(self) -> tuple[list[list[tuple[str, Any]]], list[list[tuple[str, Any]]]]:
        waves, texts = self.utterances()
        pairs = [{"audio_text": [("audio", w), ("text", t)],
                  "text_audio": [("text", t), ("audio", w)],
                  "audio": [("audio", w)]}[self.order] for w, t in zip(waves, texts)]
        n_val = max(1, round(len(pairs) * self.val_fraction))
        return pairs[:-n_val], pairs[-n_val:]


@functools.lru_cache(maxsize=2)
def _read_corpus(directory: str, rate: int) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...]]:
    """A built speech corpus' waves at `rate` and texts, read once: both reading orders of a
    pair (two sources) and the evaluation read the same files."""
    from armodal.data.audio import read_many

    meta = json.loads((Path(directory) / "meta.json").read_text())["utterances"]
    waves = read_many([Path(directory) / u["file"] for u in meta], rate)
    return tuple(waves), tuple(u["text"] for u in meta)
