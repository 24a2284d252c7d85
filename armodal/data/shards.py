"""Tokenize a source once into memmapped train/val shards plus meta.json; reuse them afterwards.

One cache entry, `<cache_dir>/<key>/`: train.bin and val.bin hold flat global ids (uint16, or
uint32 for vocabularies >= 65536), each document followed by eos; meta.json holds the tokenizer
config with its fitted state, the TokenSpace, dtype, per-split token/unit/document counts.

The key hashes the source fingerprint, the tokenizer's class and init kwargs and the split
settings. Entries are built in a temp dir and renamed into place: a crash never leaves a
directory that looks complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from armodal.data.sources import DocumentSource
from armodal.tokenizers.space import TokenSpace

FORMAT_VERSION = 1
SPLITS = ("train", "val")
_ENCODE_BATCH = 64  # documents per encode_batch call: parallel BPE without holding all ids

# A piece of text bound for one split, and whether an eos follows it (False only for the
# train half of a document that the tail split cuts in two).
_Piece = tuple[str, bool]


@dataclass
class TokenShards:
    """Memmapped token shards of one cache entry."""

    train: np.memmap  # (N_train,) global ids
    val: np.memmap  # (N_val,) global ids
    meta: dict
    path: Path
    space: TokenSpace | None = None

    def units_per_token(self, split: str) -> float:
        """Units (e.g. UTF-8 bytes) per token in `split`, eos tokens included in the count.

        bits-per-unit = mean next-token loss in nats / ln(2) / units_per_token.
        """
        return self.meta["units"][split] / self.meta["tokens"][split]


def _is_trainable(tokenizer: Any) -> bool:
    return callable(getattr(tokenizer, "fit", None)) and hasattr(tokenizer, "is_fitted")


def _cache_key(source_fp: str, tok_cfg: dict, space_dict: dict | None, val_fraction: float, split: str,
               seed: int) -> str:
    # The seed only picks documents; it must not force a re-tokenize for the tail split.
    payload = {"format": FORMAT_VERSION, "source": source_fp, "tokenizer": tok_cfg, "space": space_dict,
               "split": split, "val_fraction": val_fraction, "seed": seed if split == "documents" else None}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _read_meta(path: Path) -> dict | None:  # None unless complete and of this format
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if meta.get("complete") is True and meta.get("format") == FORMAT_VERSION else None


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x))


def _load(path: Path, tokenizer: Any, space: TokenSpace | None) -> TokenShards | None:
    """The entry at `path` if it is complete and matches the given space and fitted tokenizer."""
    meta = _read_meta(path)
    if meta is None or (space is not None and meta["space"] != _json(space.to_dict())):
        return None
    if _is_trainable(tokenizer) and not tokenizer.is_fitted:
        tokenizer.load_state_dict(meta["tokenizer"]["state"])
    elif meta["tokenizer"] != _json(tokenizer.config()):
        return None
    space = space if space is not None else TokenSpace.from_dict(meta["space"])
    dtype = np.dtype(meta["dtype"])
    train, val = (np.memmap(path / f"{s}.bin", dtype, "r", shape=(meta["tokens"][s],)) for s in SPLITS)
    return TokenShards(train=train, val=val, meta=meta, path=path, space=space)


def _split_tail(texts: list[str], val_fraction: float) -> tuple[list[_Piece], list[_Piece]]:
    # Cut the concatenated text at one character position, as nanoGPT does for one file.
    n = sum(len(t) for t in texts)
    cut = int(n * (1 - val_fraction))
    train: list[_Piece] = []
    val: list[_Piece] = []
    start = 0
    for t in texts:
        end = start + len(t)
        if end <= cut:
            train.append((t, True))
        elif start >= cut:
            val.append((t, True))
        else:
            train.append((t[: cut - start], False))
            val.append((t[cut - start :], True))
        start = end
    return train, val


def _split_documents(
    docs: list[tuple[str, str]], val_fraction: float, seed: int
) -> tuple[list[_Piece], list[_Piece]]:
    def u(name: str) -> float:  # uniform in [0, 1), stable across runs and machines
        return int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:8], "big") / 2**64

    scores = [u(name) for name, _ in docs]
    is_val = [s < val_fraction for s in scores]
    if len(docs) >= 2 and not any(is_val):
        is_val[int(np.argmin(scores))] = True
    if len(docs) >= 2 and all(is_val):
        is_val[int(np.argmax(scores))] = False
    train = [(t, True) for (_, t), v in zip(docs, is_val) if not v]
    val = [(t, True) for (_, t), v in zip(docs, is_val) if v]
    return train, val


def _encode_to(fh, pieces: list[_Piece], tokenizer: Any, space: Any, dtype: np.dtype) -> int:
    """Encode pieces to global ids, append them to the open file `fh`, return the token count."""
    encode_batch = getattr(tokenizer, "encode_batch", None)
    eos = torch.tensor([space.eos_id], dtype=torch.int64)
    n = 0
    for i in range(0, len(pieces), _ENCODE_BATCH):
        batch = pieces[i : i + _ENCODE_BATCH]
        texts = [t for t, _ in batch]
        local = encode_batch(texts) if encode_batch else [tokenizer.encode(t) for t in texts]
        if any(ids.ndim != 1 for ids in local):
            raise ValueError("shards hold 1-D token streams; the tokenizer returned (K, T) ids")
        # One to_global call per batch, then eos after each document (not after a cut half).
        global_ids = space.to_global(tokenizer.modality, torch.cat(local)).split([len(x) for x in local])
        parts = [p for g, (_, add_eos) in zip(global_ids, batch) for p in ((g, eos) if add_eos else (g,))]
        ids = torch.cat(parts)  # (T_batch,)
        fh.write(ids.numpy().astype(dtype).tobytes())
        n += ids.numel()
    return n


def _build(tmp: Path, key: str, source_fp: str, docs: list[tuple[str, str]], tokenizer: Any, space: Any,
           val_fraction: float, split: str, seed: int) -> None:
    halves = _split_tail([t for _, t in docs], val_fraction) if split == "tail" else \
        _split_documents(docs, val_fraction, seed)
    pieces = dict(zip(SPLITS, halves))
    chars = {s: sum(len(t) for t, _ in pieces[s]) for s in SPLITS}
    for s in SPLITS:
        if chars[s] == 0:
            raise ValueError(
                f"{s} split is empty: {len(docs)} document(s), {sum(chars.values())} characters, "
                f"split={split!r}, val_fraction={val_fraction}; use a larger corpus, "
                + ("split='tail' (needs only one document), " if split == "documents" else "")
                + "or a val_fraction further from 0 and 1")
    if _is_trainable(tokenizer) and not tokenizer.is_fitted:
        tokenizer.fit([t for t, _ in pieces["train"]])
    if space is None:
        space = TokenSpace.for_tokenizers(tokenizer)
    dtype = np.dtype(np.uint16 if space.vocab_size < 2**16 else np.uint32)
    tokens = {}
    for s in SPLITS:
        with open(tmp / f"{s}.bin", "wb") as fh:
            tokens[s] = _encode_to(fh, pieces[s], tokenizer, space, dtype)
    meta = {
        "format": FORMAT_VERSION,
        "key": key,
        "source": source_fp,
        "tokenizer": tokenizer.config(),
        "space": space.to_dict(),
        "dtype": dtype.name,
        "split": {"method": split, "val_fraction": val_fraction, "seed": seed},
        "tokens": tokens,
        "units": {s: sum(tokenizer.count_units(t) for t, _ in pieces[s]) for s in SPLITS},
        "documents": {s: len(pieces[s]) for s in SPLITS},
        "chars": chars,
        "complete": True,
    }
    # meta.json last: its presence with complete=true is what marks the entry usable.
    (tmp / "meta.json").write_text(json.dumps(meta))


def build_or_load_shards(
    source: DocumentSource,
    tokenizer: Any,
    space: TokenSpace | None = None,
    cache_dir: str = "~/.cache/armodal/shards",
    val_fraction: float = 0.1,
    split: str = "tail",
    seed: int = 0,
) -> TokenShards:
    """Return the train/val shards of `source` under `tokenizer`, tokenizing only on a cache miss.

    split="tail": documents are concatenated (eos after each) and the last `val_fraction` of the
    characters is val; for a single file this is nanoGPT's 90/10 character split. A document
    straddling the cut is split there (its train half gets no eos).
    split="documents": a document is val iff a seeded hash of its name is below `val_fraction`
    (at least one document per split when there are two or more).
    A trainable tokenizer that is not fitted is fitted on the train text only, or restored from
    the cache entry. `space=None` builds `TokenSpace.for_tokenizers(tokenizer)` after fitting.
    """
    if split not in ("tail", "documents"):
        raise ValueError(f"split must be 'tail' or 'documents', got {split!r}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    root = Path(os.path.expanduser(cache_dir))
    source_fp = source.fingerprint()
    full_cfg = tokenizer.config()
    init_cfg = {k: v for k, v in full_cfg.items() if k != "state"}
    # The entry normally lives under a key without fitted state or space, so an unfitted
    # tokenizer (or an explicit space equal to the default) finds it. A pre-fitted tokenizer or
    # a space that does not match that entry gets a key that includes them.
    space_dict = _json(space.to_dict()) if space is not None else None
    for key in (
        _cache_key(source_fp, init_cfg, None, val_fraction, split, seed),
        _cache_key(source_fp, full_cfg, space_dict, val_fraction, split, seed),
    ):
        hit = _load(root / key, tokenizer, space)
        if hit is not None:
            return hit
        if _read_meta(root / key) is None:
            break
    final = root / key

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        _build(tmp, key, source_fp, list(source.documents()), tokenizer, space, val_fraction, split, seed)
        # If a concurrent run completed this entry meanwhile, keep theirs.
        if _read_meta(final) is None:
            shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    hit = _load(final, tokenizer, space)
    if hit is None:
        raise RuntimeError(f"shard cache entry {final} does not match this tokenizer; delete it and rerun")
    return hit
