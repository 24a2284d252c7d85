"""The benchmark corpus: the Python standard library's source, byte-level BPE, cached on disk.

Every machine has the corpus, so the trained benchmark models are reproducible offline. Every
20th module (sorted by path; more often in a small corpus) is held out: prompts and perplexity
come from code the models never saw in training, while the held-out modules still cover every
corner of the library. Modules are joined with a blank line; the tokenizer has no special
tokens, so ids are plain BPE ids.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from armodal.data.sources import StdlibSource
from armodal.evaluate import mean_nll
from armodal.tokenizers.text import BPETokenizer

HOLDOUT_EVERY = 20
SEPARATOR = "\n\n"


@dataclass
class Corpus:
    """Train and held-out token ids of the stdlib corpus, and the fitted tokenizer."""

    tokenizer: BPETokenizer
    train: np.ndarray  # (N,) uint16 or int32 ids
    val: np.ndarray

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def prompts(self, batch: int, length: int, seed: int = 0) -> torch.Tensor:
        """(batch, length) int64: random windows of held-out code, so drafts and prompt
        lookup see realistic continuations rather than noise."""
        starts = np.random.default_rng(seed).integers(0, len(self.val) - length, batch)
        return torch.tensor(np.stack([self.val[s:s + length] for s in starts]), dtype=torch.long)

    def windows(self, split: str, batch: int, length: int,
                rng: np.random.Generator) -> torch.Tensor:
        """(batch, length) int64 random training windows of `split` ("train" or "val")."""
        ids = self.train if split == "train" else self.val
        starts = rng.integers(0, len(ids) - length, batch)
        return torch.tensor(np.stack([ids[s:s + length] for s in starts]), dtype=torch.long)


def held_out_nll(model: torch.nn.Module, corpus: Corpus, seq_len: int, batches: int) -> float:
    """Mean next-token NLL (nats) on `batches` spans of 8 consecutive seq_len windows, spread
    evenly over the held-out split, so every part of the library counts, not only its first
    modules (armodal.evaluate.mean_nll scores each span; spans are equal-sized, so the mean
    of their means is the mean over all windows)."""
    span = 8 * seq_len + 1
    starts = np.linspace(0, len(corpus.val) - span, batches).astype(int)
    nlls = [mean_nll(model, torch.from_numpy(corpus.val[s:s + span].astype(np.int64)), seq_len,
                     batch_size=8) for s in starts]
    return float(np.mean(nlls))


def load_corpus(directory: Path, vocab_size: int, max_bytes: int | None) -> Corpus:
    """The corpus cached under `directory`, built (fit + encode, ~20 s) on first use."""
    meta_path = directory / "corpus.json"
    wanted = {"vocab_size": vocab_size, "max_bytes": max_bytes, "holdout_every": HOLDOUT_EVERY}
    if meta_path.is_file() and json.loads(meta_path.read_text()).get("settings") == wanted:
        tokenizer = BPETokenizer(vocab_size)
        tokenizer.load_state_dict(json.loads((directory / "tokenizer.json").read_text()))
        return Corpus(tokenizer, np.load(directory / "train.npy"), np.load(directory / "val.npy"))

    docs = [text for _, text in StdlibSource(max_bytes=max_bytes).documents()]
    every = min(HOLDOUT_EVERY, max(2, len(docs) // 4))  # a small corpus still holds some out
    held_out = [d for i, d in enumerate(docs) if i % every == every - 1]
    training = [d for i, d in enumerate(docs) if i % every != every - 1]
    tokenizer = BPETokenizer(vocab_size)
    tokenizer.fit(training)
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.int32
    train, val = (np.concatenate([t.numpy() for t in tokenizer.encode_batch(
        [d + SEPARATOR for d in split])]).astype(dtype) for split in (training, held_out))
    directory.mkdir(parents=True, exist_ok=True)
    np.save(directory / "train.npy", train)
    np.save(directory / "val.npy", val)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer.state_dict()))
    meta = {"settings": wanted, "train_tokens": len(train), "val_tokens": len(val),
            "documents": len(docs), "held_out_documents": len(held_out)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")  # written last: marks completion
    return Corpus(tokenizer, train, val)
