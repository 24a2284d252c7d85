"""Tests for armodal.data: sources, cached token shards and the TokenDataModule."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from armodal.data import (
    StdlibSource,
    TextSource,
    TokenDataModule,
    WindowDataset,
    build_or_load_shards,
)
from armodal.tokenizers.space import TokenSpace
from armodal.tokenizers.text import BPETokenizer, ByteTokenizer, CharTokenizer

# Non-ASCII on purpose: a byte cut and a character cut differ, so the tail split is pinned down.
TEXT = "".join(f"line {i}: naïve café — ünïcödé ✓ {'x' * (i % 7)}\n" for i in range(200))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A folder of 12 small documents in two subfolders, plus one empty file and a .md file."""
    root = tmp_path / "corpus"
    for i in range(12):
        write(root / f"d{i % 2}" / f"doc{i:02d}.txt", f"document {i}\n" + TEXT[: 300 + 37 * i])
    write(root / "empty.txt", "")
    write(root / "notes.md", "not text")
    return root


def local(shards_split: np.ndarray, space: TokenSpace) -> list[list[int]]:
    """Global ids -> per-document lists of local text ids, cut at eos."""
    docs, cur = [], []
    for t in shards_split.tolist():
        if t == space.eos_id:
            docs.append(cur)
            cur = []
        else:
            cur.append(t - space.offset("text"))
    return docs + ([cur] if cur else [])


def text_of(ids: np.ndarray, space: TokenSpace, tok=ByteTokenizer()) -> str:
    return tok.decode(space.to_local("text", torch.from_numpy(ids.astype(np.int64))))


# ---------------------------------------------------------------- sources


def test_text_source_file_folder_glob(tmp_path: Path, corpus: Path) -> None:
    f = write(tmp_path / "one.txt", TEXT)
    assert list(TextSource(str(f)).documents()) == [("one.txt", TEXT)]

    docs = list(TextSource(str(corpus), pattern="**/*.txt").documents())
    names = [n for n, _ in docs]
    assert names == sorted(names) and len(names) == 12  # recursive, sorted, empty file skipped
    assert names[0] == "d0/doc00.txt" and docs[0][1].startswith("document 0\n")
    assert "notes.md" in [n for n, _ in TextSource(str(corpus)).documents()]

    globbed = [n for n, _ in TextSource(str(corpus / "d1" / "doc*.txt")).documents()]
    assert globbed == [f"doc{i:02d}.txt" for i in range(1, 12, 2)]  # relative to the literal prefix


def test_text_source_limits(corpus: Path) -> None:
    assert len(list(TextSource(str(corpus), "**/*.txt", max_files=3).documents())) == 3
    docs = list(TextSource(str(corpus), "**/*.txt", max_bytes=1000).documents())
    assert sum(len(t.encode()) for _, t in docs) <= 1000 + 3  # a cut inside a char becomes U+FFFD
    assert len(docs) >= 2


def test_text_source_missing_and_empty(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope.*file, a folder"):
        TextSource(missing).fingerprint()
    write(tmp_path / "e" / "a.txt", "")
    with pytest.raises(ValueError, match="empty corpus.*matched 1 file"):
        list(TextSource(str(tmp_path / "e")).documents())
    with pytest.raises(ValueError, match=r"empty corpus.*\*\*/\*\.py"):
        TextSource(str(tmp_path / "e"), pattern="**/*.py").fingerprint()
    with pytest.raises(ValueError, match="empty corpus"):
        TextSource(str(tmp_path / "e" / "*.zzz")).fingerprint()


def test_fingerprint_tracks_files_and_settings_without_reading(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    src = TextSource(str(corpus))
    with monkeypatch.context() as m:  # cheap: stat only, never opens a file
        m.setattr(builtins, "open", lambda *a, **k: pytest.fail("fingerprint read a file"))
        fp = src.fingerprint()
    assert fp == TextSource(str(corpus)).fingerprint()
    assert fp != TextSource(str(corpus), max_files=5).fingerprint()
    f = corpus / "d0" / "doc00.txt"
    st = f.stat()
    f.write_text("Document 0\n" + TEXT[:300], encoding="utf-8")  # same size, new content
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert src.fingerprint() != fp


def test_stdlib_source_real_code_without_tests() -> None:
    names = [n for n, _ in StdlibSource().documents()]
    assert "os.py" in names and "json/decoder.py" in names and len(names) > 300
    assert all(n.endswith(".py") for n in names)
    for n in names:
        parts = n.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages"} & set(parts), n
    name, text = next(StdlibSource(max_files=1).documents())
    assert name == names[0] and len(text) > 0
    with_tests = StdlibSource(include_tests=True).documents()
    assert any("test" in n.split("/")[:-1] for n, _ in with_tests)


# ---------------------------------------------------------------- shards


def test_tail_split_is_exact_character_split(tmp_path: Path) -> None:
    src = TextSource(str(write(tmp_path / "input.txt", TEXT)))
    shards = build_or_load_shards(src, ByteTokenizer(), None, str(tmp_path / "cache"))
    space = shards.space
    n = len(TEXT)
    cut = int(n * 0.9)  # nanoGPT: data[:int(n*0.9)], data[int(n*0.9):]
    assert text_of(shards.train, space) == TEXT[:cut]
    assert shards.val[-1] == space.eos_id and space.eos_id not in shards.val[:-1]
    assert text_of(shards.val[:-1], space) == TEXT[cut:]
    assert shards.meta["chars"] == {"train": cut, "val": n - cut}
    # Units are bytes, eos tokens are tokens: train has no eos, val has one.
    ntr, nva = len(TEXT[:cut].encode()), len(TEXT[cut:].encode())
    assert shards.meta["units"] == {"train": ntr, "val": nva}
    assert shards.units_per_token("train") == 1.0
    assert shards.units_per_token("val") == nva / (nva + 1)
    assert shards.meta["tokenizer"]["target"].endswith("ByteTokenizer")
    assert shards.meta["complete"] is True and shards.meta["dtype"] == "uint16"


def test_tail_split_over_documents(tmp_path: Path, corpus: Path) -> None:
    src = TextSource(str(corpus), "**/*.txt")
    texts = [t for _, t in src.documents()]
    shards = build_or_load_shards(src, ByteTokenizer(), None, str(tmp_path / "c"), val_fraction=0.25)
    space = shards.space
    joined = "".join(texts)
    cut = int(len(joined) * 0.75)
    train_docs, val_docs = local(shards.train, space), local(shards.val, space)
    # Docs joined with eos; the one straddling the cut ends train without an eos.
    decode = lambda ds: [ByteTokenizer().decode(torch.tensor(d)) for d in ds]  # noqa: E731
    assert "".join(decode(train_docs)) == joined[:cut] and shards.train[-1] != space.eos_id
    assert "".join(decode(val_docs)) == joined[cut:]
    assert len(train_docs) + len(val_docs) == len(texts) + 1
    assert shards.meta["documents"] == {"train": len(train_docs), "val": len(val_docs)}


def test_documents_split_deterministic_and_whole(tmp_path: Path, corpus: Path) -> None:
    src = TextSource(str(corpus), "**/*.txt")
    texts = {t for _, t in src.documents()}

    def split(seed: int, frac: float = 0.3, cache: str = "a") -> tuple[set, set]:
        s = build_or_load_shards(src, ByteTokenizer(), None, str(tmp_path / cache), frac, "documents", seed)
        return tuple({ByteTokenizer().decode(torch.tensor(d)) for d in local(x, s.space)} for x in (s.train, s.val))

    train, val = split(0)
    assert train | val == texts and not train & val and train and val
    assert split(0, cache="b") == (train, val)  # fresh cache, same answer
    assert any(split(seed)[1] != val for seed in (1, 2, 3))
    for frac in (0.001, 0.999):  # at least one document per split
        tr, va = split(0, frac)
        assert len(tr) >= 1 and len(va) >= 1


def test_empty_split_raises(tmp_path: Path) -> None:
    src = TextSource(str(write(tmp_path / "one.txt", TEXT)))
    with pytest.raises(ValueError, match="val split is empty.*1 document.*split='tail'"):
        build_or_load_shards(src, ByteTokenizer(), None, str(tmp_path / "c"), split="documents")
    tiny = TextSource(str(write(tmp_path / "tiny.txt", "a")))
    with pytest.raises(ValueError, match="train split is empty.*1 characters"):
        build_or_load_shards(tiny, ByteTokenizer(), None, str(tmp_path / "c"), val_fraction=0.1)


def test_shards_reused_not_retokenized(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    src, cache = TextSource(str(corpus), "**/*.txt"), str(tmp_path / "c")
    first = build_or_load_shards(src, ByteTokenizer(), None, cache)
    tok = ByteTokenizer()
    monkeypatch.setattr(tok, "encode", lambda s: pytest.fail("re-tokenized"))
    monkeypatch.setattr(tok, "encode_batch", lambda s: pytest.fail("re-tokenized"))
    second = build_or_load_shards(src, tok, None, cache)
    assert second.path == first.path and np.array_equal(second.train, first.train)
    assert isinstance(second.train, np.memmap) and second.meta == first.meta
    assert [p.name for p in Path(cache).iterdir()] == [first.path.name]  # no temp dirs left


def test_trainable_tokenizer_fitted_on_train_and_restored(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    src, cache = TextSource(str(corpus), "**/*.txt"), str(tmp_path / "c")
    tok = CharTokenizer()
    shards = build_or_load_shards(src, tok, None, cache, split="tail", val_fraction=0.5)
    train_text = "".join(t for _, t in src.documents())[: shards.meta["chars"]["train"]]
    assert tok.alphabet == "".join(sorted(set(train_text)))  # train text only
    assert shards.space.vocab_size == 3 + tok.vocab_size

    fresh = CharTokenizer()
    monkeypatch.setattr(fresh, "fit", lambda s: pytest.fail("refitted"))
    again = build_or_load_shards(src, fresh, None, cache, split="tail", val_fraction=0.5)
    assert again.path == shards.path and fresh.alphabet == tok.alphabet  # state restored
    # A pre-fitted tokenizer with the same state reuses the entry; a different state does not.
    assert build_or_load_shards(src, tok, None, cache, val_fraction=0.5).path == shards.path
    other = CharTokenizer(alphabet=tok.alphabet + "#")
    assert build_or_load_shards(src, other, None, cache, val_fraction=0.5).path != shards.path


def test_tokenizer_config_change_rebuilds(tmp_path: Path, corpus: Path) -> None:
    src, cache = TextSource(str(corpus), "**/*.txt"), str(tmp_path / "c")
    a = build_or_load_shards(src, BPETokenizer(vocab_size=300), None, cache)
    b = build_or_load_shards(src, BPETokenizer(vocab_size=320), None, cache)
    c = build_or_load_shards(src, BPETokenizer(vocab_size=300), None, cache)
    assert a.path != b.path and c.path == a.path
    assert len(b.train) < len(a.train)  # more merges, fewer tokens
    assert b.units_per_token("train") > a.units_per_token("train") > 1
    d = build_or_load_shards(src, BPETokenizer(vocab_size=300), None, cache, val_fraction=0.2)
    assert d.path != a.path


def test_interrupted_build_leaves_nothing_complete(tmp_path: Path, corpus: Path, monkeypatch) -> None:
    src, cache = TextSource(str(corpus), "**/*.txt"), tmp_path / "c"
    tok = ByteTokenizer()
    calls = []

    def flaky(samples):
        calls.append(1)
        if len(calls) == 2:  # train written, val mid-way
            raise KeyboardInterrupt
        return [ByteTokenizer().encode(s) for s in samples]

    monkeypatch.setattr(tok, "encode_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_or_load_shards(src, tok, None, str(cache))
    assert not list(cache.rglob("meta.json")) and not list(cache.iterdir())
    shards = build_or_load_shards(src, ByteTokenizer(), None, str(cache))
    assert json.loads((shards.path / "meta.json").read_text())["complete"] is True


def test_large_vocab_uses_uint32(tmp_path: Path) -> None:
    src = TextSource(str(write(tmp_path / "one.txt", TEXT)))
    space = TokenSpace({"text": 70_000})
    shards = build_or_load_shards(src, ByteTokenizer(), space, str(tmp_path / "c"))
    assert shards.meta["dtype"] == "uint32" and shards.train.dtype == np.uint32
    assert text_of(shards.train, space) == TEXT[: int(len(TEXT) * 0.9)]


def test_explicit_space_reuses_matching_entry(tmp_path: Path, corpus: Path) -> None:
    src, cache = TextSource(str(corpus), "**/*.txt"), str(tmp_path / "c")
    auto = build_or_load_shards(src, BPETokenizer(vocab_size=300), None, cache)
    tok = BPETokenizer(vocab_size=300)
    tok.load_state_dict(auto.meta["tokenizer"]["state"])
    # What evaluation does: the fitted tokenizer and the run's space find the training entry.
    space = TokenSpace.for_tokenizers(tok)
    assert build_or_load_shards(src, tok, space, cache).path == auto.path
    marked = TokenSpace.for_tokenizers(tok, markers={"text": ("<bot>", "<eot>")})
    other = build_or_load_shards(src, tok, marked, cache)
    assert other.path != auto.path and other.space is marked
    shift = marked.offset("text") - space.offset("text")
    assert np.array_equal(other.train.astype(np.int64), auto.train.astype(np.int64) + shift * (auto.train != 2))


# ---------------------------------------------------------------- datamodule


def make_dm(tmp_path: Path, corpus: Path, **kw) -> TokenDataModule:
    args = dict(source=TextSource(str(corpus), "**/*.txt"), tokenizer=ByteTokenizer(), seq_len=16,
                batch_size=4, cache_dir=str(tmp_path / "c"))
    dm = TokenDataModule(**{**args, **kw})
    dm.setup("fit")
    return dm


def test_windows_shapes_and_shift(tmp_path: Path, corpus: Path) -> None:
    dm = make_dm(tmp_path, corpus)
    tokens = dm.shards.train
    ds = dm.train_windows
    assert len(ds) == (len(tokens) - 1) // 16
    for i in (0, 1, len(ds) - 1):
        assert torch.equal(ds[i], torch.from_numpy(tokens[i * 16 : i * 16 + 17].astype(np.int64)))
    # Targets (x[1:]) are inputs shifted by one; consecutive windows share their edge token.
    assert ds[0][-1] == ds[1][0]
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (4, 17) and batch.dtype == torch.int64
    val = list(dm.val_dataloader())
    assert torch.equal(torch.cat(val)[:, :-1].reshape(-1), torch.from_numpy(dm.shards.val[: len(dm.val_windows) * 16].astype(np.int64)))


def test_train_order_seeded(tmp_path: Path, corpus: Path) -> None:
    def order(seed: int, sampling: str = "windows", epochs: int = 1) -> list[torch.Tensor]:
        dm = make_dm(tmp_path, corpus, seed=seed, train_sampling=sampling)
        loader = dm.train_dataloader()
        return [torch.cat(list(loader)) for _ in range(epochs)]

    a = order(0)[0]
    assert torch.equal(a, order(0)[0]) and not torch.equal(a, order(1)[0])
    dm = make_dm(tmp_path, corpus)
    assert len(a) == len(dm.train_windows) // 4 * 4  # drop_last
    in_order = [tuple(dm.train_windows[i].tolist()) for i in range(len(dm.train_windows))]
    assert set(map(tuple, a.tolist())) <= set(in_order) and a.tolist() != [list(w) for w in in_order[: len(a)]]

    r1, r2 = order(0, "random", epochs=2)
    assert torch.equal(r1, order(0, "random")[0]) and not torch.equal(r1, r2)  # new offsets per epoch
    assert r1.shape == a.shape
    stream = dm.shards.train.astype(np.int64)
    for w in r1[:8]:  # every window is a contiguous slice of the train stream
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(stream, 17).__eq__(w.numpy()).all(1))
        assert len(starts) >= 1


def test_val_batches_cap_and_errors(tmp_path: Path, corpus: Path) -> None:
    dm = make_dm(tmp_path, corpus, val_batches=2, val_fraction=0.5)
    n = len(dm.val_windows)
    batches = list(dm.val_dataloader())
    assert len(batches) == 2 and n > 8
    first = torch.stack([dm.val_windows[i] for i in np.linspace(0, n - 1, 8).round().astype(int)])
    assert torch.equal(torch.cat(batches), first)  # evenly spaced, in order, deterministic
    with pytest.raises(ValueError, match=r"val split has \d+ tokens, fewer than seq_len \+ 1"):
        make_dm(tmp_path, corpus, seq_len=1000)  # fits the train split, not val


def test_prepare_shards_gives_vocab_before_model(tmp_path: Path, corpus: Path) -> None:
    tok = BPETokenizer(vocab_size=300)
    dm = TokenDataModule(TextSource(str(corpus), "**/*.txt"), tok, seq_len=8, batch_size=2,
                         cache_dir=str(tmp_path / "c"), num_workers=1)
    shards = dm.prepare_shards()
    assert dm.prepare_shards() is shards  # idempotent
    assert dm.space.vocab_size == 3 + tok.vocab_size and tok.is_fitted
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert loader.persistent_workers
    batch = next(iter(loader))
    assert batch.shape == (2, 9) and int(batch.max()) < dm.space.vocab_size


def test_window_dataset_stride_and_short_input() -> None:
    tokens = np.arange(10, dtype=np.uint16)
    ds = WindowDataset(tokens, 3, stride=1)
    assert len(ds) == 7 and ds[6].tolist() == [6, 7, 8, 9]
    with pytest.raises(IndexError):
        ds[7]
    with pytest.raises(ValueError, match="10 tokens, fewer than seq_len"):
        WindowDataset(tokens, 10)
