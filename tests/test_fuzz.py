"""Property-based fuzz tests (hypothesis): tokenizers, TokenSpace, DecodingConfig, loaders.

Every property is a plain `check_*` function; `_pair` turns it into a default test that runs a
few dozen examples and a `slow`-marked twin that runs many more (`pytest -m slow`).
A "clean error" is a ValueError (TypeError only where documented) with a message.
"""

from __future__ import annotations

import functools
import io
import json
import math
import struct
import sysconfig
import tempfile
import time
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from armodal.checkpoint import load_run, save_run
from armodal.data import audio as audio_data
from armodal.data.audio import read_audio, read_native, resample_many
from armodal.data.episodes import Episode, load_episode, save_episode
from armodal.generation.config import DecodingConfig
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.action import BinTokenizer, DiscreteTokenizer
from armodal.tokenizers.audio import MuLawTokenizer
from armodal.tokenizers.image import PixelTokenizer
from armodal.tokenizers.space import TokenSpace
from armodal.tokenizers.text import BPETokenizer, ByteTokenizer, CharTokenizer

FAST_EXAMPLES = 30
SLOW_EXAMPLES = 500
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


def _pair(check, *strategies, fast: int = FAST_EXAMPLES, examples=(), **kw):
    """(default test, slow test) running `check` under @given(*strategies, **kw); each tuple in
    `examples` is an explicit @example (a past finding) both of them run first."""

    def build(n: int, slow: bool):
        test = given(*strategies, **kw)(check)
        for args in examples:
            test = example(*args)(test)
        test = settings(max_examples=n, deadline=None, suppress_health_check=_HEALTH,
                        derandomize=not slow)(test)
        return pytest.mark.slow(test) if slow else test

    return build(fast, False), build(SLOW_EXAMPLES, True)


def _clean(err: BaseException) -> None:
    """A clean error: ValueError with a non-empty message."""
    assert isinstance(err, ValueError), f"unclean {type(err).__name__}: {err}"
    assert str(err).strip(), "error without a message"


SAFE_TEXT = st.text()  # hypothesis excludes surrogates by default
SURROGATE = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
# Text holding at least one lone surrogate (Python str may hold them), anywhere in it. (Mixing
# SURROGATE into text()'s alphabet instead gives one in about 1 text of 300: its 2048 code
# points are a sliver of all characters.)
WITH_SURROGATE = st.tuples(
    st.text(max_size=8), SURROGATE, st.text(st.one_of(st.characters(), SURROGATE), max_size=8),
    st.lists(SURROGATE, max_size=2)).map(lambda t: t[0] + t[1] + t[2] + "".join(t[3]))
ANY_TEXT = st.one_of(SAFE_TEXT, WITH_SURROGATE)


def _has_surrogate(s: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in s)


# ----------------------------------------------------------------------------- text tokenizers


def check_byte_roundtrip(s):
    tok = ByteTokenizer()
    if _has_surrogate(s):
        with pytest.raises(ValueError, match=r"\S"):
            tok.encode(s)
        return
    ids = tok.encode(s)
    assert ids.dtype == torch.int64 and ids.ndim == 1
    assert len(ids) == tok.count_units(s) == len(s.encode("utf-8"))
    assert ((ids >= 0) & (ids < 256)).all()
    assert tok.decode(ids) == s


def _check_text_decode_any(tok, ids):
    """Any ids decode to a str, or fail cleanly exactly when one is outside the vocabulary."""
    try:
        out = tok.decode(torch.tensor(ids, dtype=torch.int64))
    except ValueError as err:
        _clean(err)
        assert any(i < 0 or i >= tok.vocab_size for i in ids)
        return
    assert isinstance(out, str) and all(0 <= i < tok.vocab_size for i in ids)


def check_byte_decode_any(ids):
    _check_text_decode_any(ByteTokenizer(), ids)


test_byte_roundtrip, test_byte_roundtrip_slow = _pair(check_byte_roundtrip, ANY_TEXT)
test_byte_decode_any_ids, test_byte_decode_any_ids_slow = _pair(
    check_byte_decode_any, st.lists(st.integers(-300, 600), max_size=40))


def check_char(corpus, data):
    tok = CharTokenizer()
    tok.fit(corpus)
    alphabet = sorted(set("".join(corpus)))
    assert tok.vocab_size == len(alphabet)
    inside = data.draw(st.text(st.sampled_from(alphabet), max_size=50))
    ids = tok.encode(inside)
    assert ids.dtype == torch.int64 and len(ids) == len(inside)
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == inside
    other = data.draw(ANY_TEXT.filter(lambda s: any(c not in alphabet for c in s)))
    with pytest.raises(ValueError, match="alphabet|not valid Unicode"):
        tok.encode(other)
    # State round trip gives the same ids.
    assert torch.equal(CharTokenizer(tok.state_dict()["alphabet"]).encode(inside), ids)


test_char_roundtrip, test_char_roundtrip_slow = _pair(
    check_char, st.lists(SAFE_TEXT, min_size=1, max_size=4).filter(lambda c: "".join(c)),
    st.data())


@functools.lru_cache(maxsize=1)
def _bpe() -> BPETokenizer:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    tok = BPETokenizer(vocab_size=300, min_frequency=2)
    tok.fit([(stdlib / "textwrap.py").read_text()[:20000], "héllo wörld ✓ 日本語 " * 20])
    return tok


def check_bpe_roundtrip(s):
    tok = _bpe()
    try:
        ids = tok.encode(s)
    except (ValueError, TypeError) as err:
        # The only documented TypeError is for a non-str; s is a str, so it must be ValueError.
        _clean(err)
        return
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    assert tok.decode(ids) == s


def check_bpe_decode_any(ids):
    _check_text_decode_any(_bpe(), ids)


test_bpe_roundtrip_text, test_bpe_roundtrip_text_slow = _pair(check_bpe_roundtrip, SAFE_TEXT)
test_bpe_roundtrip_any_str, test_bpe_roundtrip_any_str_slow = _pair(
    check_bpe_roundtrip, WITH_SURROGATE)
test_bpe_decode_any_ids, test_bpe_decode_any_ids_slow = _pair(
    check_bpe_decode_any, st.lists(st.integers(-5, 320), max_size=40))


def _first_surrogate(corpus: list[str]) -> tuple[int, int] | None:
    """(document, character) of the first lone surrogate in `corpus`, or None."""
    for doc, s in enumerate(corpus):
        for pos, c in enumerate(s):
            if 0xD800 <= ord(c) <= 0xDFFF:
                return doc, pos
    return None


def check_fit_corpus(corpus):
    """fit takes any corpus of valid text; one holding a lone surrogate is refused with a
    ValueError naming the first bad document and character, and leaves the tokenizer unfitted."""
    bad = _first_surrogate(corpus)
    for tok in (CharTokenizer(), BPETokenizer(vocab_size=260, min_frequency=1)):
        name = type(tok).__name__
        if bad is not None:
            with pytest.raises(ValueError, match=rf"{name}\.fit: document {bad[0]} of the corpus "
                                                 rf"is not valid Unicode: .* at character {bad[1]} "):
                tok.fit(iter(corpus))  # a stream: the check must not need a second pass
            assert not tok.is_fitted
        elif isinstance(tok, CharTokenizer) and not "".join(corpus):
            with pytest.raises(ValueError, match="no characters"):
                tok.fit(corpus)
        else:
            tok.fit(iter(corpus))
            if isinstance(tok, CharTokenizer):
                assert tok.alphabet == "".join(sorted(set("".join(corpus))))
            for s in corpus:
                assert tok.decode(tok.encode(s)) == s


test_fit_corpus, test_fit_corpus_slow = _pair(
    check_fit_corpus, st.lists(ANY_TEXT, max_size=5),
    examples=[(["ok", "c\ud800d"],), (["\udfff"],), (["é", "", "x\udc80\ud800"],)])


def test_fit_refuses_bad_documents():
    for tok in (CharTokenizer(), BPETokenizer(vocab_size=260)):
        name = type(tok).__name__
        with pytest.raises(ValueError, match=rf"{name}\.fit: document 2 of the corpus is not "
                                             r"valid Unicode: .*'\\ud800' at character 3"):
            tok.fit(["abc", "déf", "ghé\ud800"])
        with pytest.raises(TypeError, match=rf"{name}\.fit .* document 1 of the corpus is bytes"):
            tok.fit(["abc", b"def"])
        assert not tok.is_fitted
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer().fit(["", ""])
    with pytest.raises(ValueError, match=r"alphabet is not valid Unicode: .* at character 1"):
        CharTokenizer(alphabet="a\ud800")  # e.g. from a config.json holding "\\ud800"
    assert CharTokenizer(json.loads(json.dumps(CharTokenizer("ab😀").alphabet))).vocab_size == 3


def test_char_fit_check_is_cheap():
    """The surrogate check adds little to fit on a large corpus (one set update per document)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + "héllo wörld ✓ 日本語\n"
    corpus = [text] * 200 + text.splitlines() * 20  # ~4 MB: a few long and many short documents

    def best(f):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    def bare():
        chars: set[str] = set()
        for s in corpus:
            chars.update(s)

    fit = best(lambda: CharTokenizer().fit(corpus))
    assert fit < 1.5 * best(bare) + 0.02, (fit, best(bare))


# ----------------------------------------------------------------------------- mu-law audio


def _compand(x: np.ndarray, mu: int) -> np.ndarray:
    return np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)


def check_mulaw(bits, wave):
    tok = MuLawTokenizer(bits=bits)
    x = torch.from_numpy(wave)
    ids = tok.encode(x)
    assert ids.dtype == torch.int64 and ids.shape == x.shape
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    y = tok.decode(ids)
    assert y.dtype == torch.float32 and y.shape == x.shape
    assert ((y >= -1) & (y <= 1)).all()
    mu = tok.vocab_size - 1
    # Documented: within half a companded step (the step is 2 / mu in companded space).
    err = np.abs(_compand(wave.astype(np.float64), mu) - _compand(y.double().numpy(), mu))
    assert err.max() <= 1.0 / mu + 1e-5, (err.max(), 1.0 / mu)


MULAW_WAVE = hnp.arrays(np.float32, st.integers(1, 64),
                        elements=st.floats(-1, 1, width=32, allow_subnormal=True))
test_mulaw_roundtrip, test_mulaw_roundtrip_slow = _pair(
    check_mulaw, st.integers(1, 16), MULAW_WAVE)


def check_mulaw_bad_input(wave):
    tok = MuLawTokenizer()
    with pytest.raises(ValueError, match=r"\S"):
        tok.encode(wave)


BAD_WAVES = st.one_of(
    st.integers(0, 8).map(lambda n: torch.zeros(n, dtype=torch.int64)),  # wrong dtype
    st.integers(1, 8).map(lambda n: torch.zeros(n, dtype=torch.bool)),
    st.tuples(st.integers(1, 3), st.integers(1, 4)).map(lambda s: torch.zeros(s)),  # ndim 2
    st.just(torch.tensor(0.5)),  # ndim 0
    st.just(torch.zeros(0)),  # no samples
    st.lists(st.floats(-1, 1), min_size=1, max_size=4),  # not a tensor
)
test_mulaw_bad_input, test_mulaw_bad_input_slow = _pair(check_mulaw_bad_input, BAD_WAVES)

test_mulaw_nonfinite, test_mulaw_nonfinite_slow = _pair(
    check_mulaw_bad_input,
    hnp.arrays(np.float32, st.integers(1, 16), elements=st.floats(-1, 1, width=32))
    .flatmap(lambda a: st.tuples(st.integers(0, len(a) - 1),
                                 st.sampled_from([math.nan, math.inf, -math.inf]))
             .map(lambda t: torch.from_numpy(np.where(np.arange(len(a)) == t[0],
                                                      np.float32(t[1]), a)))))


def check_mulaw_decode_any(ids):
    tok = MuLawTokenizer()
    t = torch.tensor(ids, dtype=torch.int64)
    try:
        y = tok.decode(t)
    except ValueError as err:
        _clean(err)
        assert any(i < 0 or i >= 256 for i in ids)
        return
    assert ((y >= -1) & (y <= 1)).all()


test_mulaw_decode_any, test_mulaw_decode_any_slow = _pair(
    check_mulaw_decode_any, st.lists(st.integers(-10, 300), max_size=30))


# ----------------------------------------------------------------------------- action tokenizers

MODERATE = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


def _fit_data(elements):
    return st.tuples(st.integers(1, 30), st.integers(1, 3)).flatmap(
        lambda s: hnp.arrays(np.float64, s, elements=elements))


def check_bin_tokenizer(scheme, n_bins, out_of_range, fit_x, data):
    tok = BinTokenizer(n_bins=n_bins, scheme=scheme, out_of_range=out_of_range)
    tok.fit([fit_x])
    d = fit_x.shape[1]
    edges = tok.bin_edges
    assert edges.shape == (d, n_bins + 1) and np.isfinite(edges).all()
    assert (np.diff(edges, axis=1) >= 0).all()
    x = data.draw(hnp.arrays(np.float64, st.tuples(st.integers(1, 10), st.just(d)),
                             elements=st.one_of(MODERATE, st.sampled_from(list(fit_x.ravel())))))
    lo, hi = edges[:, 0], edges[:, -1]
    inside = (x >= lo) & (x <= hi)
    if not inside.all() and out_of_range == "error":
        with pytest.raises(ValueError, match="out_of_range"):
            tok.encode(x)
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = tok.encode(x)
    assert bool(caught) == (not inside.all())
    assert ids.shape == (d, len(x)) and ids.dtype == torch.int64
    ids = ids.numpy().T  # (T, D)
    assert ((ids >= 0) & (ids < n_bins)).all()
    cols = np.arange(d)[None, :].repeat(len(x), 0)
    left, right = edges[cols, ids], edges[cols, ids + 1]
    clamped = np.clip(x, lo, hi)
    assert ((left <= clamped) & (clamped <= right)).all(), "value outside its bin"
    dec = tok.decode(torch.from_numpy(ids.T.copy()))
    assert dec.shape == x.shape and dec.dtype == np.float32
    centre = 0.5 * (left + right)
    assert np.array_equal(dec, centre.astype(np.float32))
    # Within half a bin of every in-range input (plus float32 rounding).
    tol = 0.5 * (right - left) + np.spacing(np.abs(centre).astype(np.float32))
    assert (np.abs(dec - x)[inside] <= tol[inside]).all()


test_bin_tokenizer, test_bin_tokenizer_slow = _pair(
    check_bin_tokenizer, st.sampled_from(["uniform", "quantile", "mulaw"]), st.integers(2, 64),
    st.sampled_from(["clamp", "error"]), _fit_data(MODERATE), st.data())

ANY_FINITE = st.floats(allow_nan=False, allow_infinity=False)


def check_bin_tokenizer_any_finite(scheme, n_bins, out_of_range, fit_x, data):
    """Data beyond what float32 bins can hold is refused at fit; anything else bins as above."""
    if np.abs(fit_x).max() > 1e37:
        with pytest.raises(ValueError, match="must stay within"):
            BinTokenizer(n_bins=n_bins, scheme=scheme).fit([fit_x])
        return
    check_bin_tokenizer(scheme, n_bins, out_of_range, fit_x, data)


test_bin_tokenizer_full_range, test_bin_tokenizer_full_range_slow = _pair(
    check_bin_tokenizer_any_finite, st.sampled_from(["uniform", "quantile"]), st.integers(2, 64),
    st.sampled_from(["clamp", "error"]), _fit_data(ANY_FINITE), st.data())


def check_bin_bad_input(scheme, fit_x, bad):
    tok = BinTokenizer(n_bins=8, scheme=scheme)
    tok.fit([fit_x])
    d = fit_x.shape[1]
    kind, value = bad
    if kind == "nonfinite":
        x = np.zeros((3, d))
        x[1, d - 1] = value
    elif kind == "wrong_d":
        x = np.zeros((2, d + value))
    else:  # wrong ndim
        x = np.zeros((1,) * value)
    with pytest.raises(ValueError, match=r"\S"):
        tok.encode(x)
    if x.ndim == 2:
        with pytest.raises(ValueError, match=r"\S"):
            tok.encode_array(x)


BIN_BAD = st.one_of(
    st.tuples(st.just("nonfinite"), st.sampled_from([math.nan, math.inf, -math.inf])),
    st.tuples(st.just("wrong_d"), st.integers(1, 3)),
    st.tuples(st.just("ndim"), st.sampled_from([0, 3, 4])))
test_bin_bad_input, test_bin_bad_input_slow = _pair(
    check_bin_bad_input, st.sampled_from(["uniform", "quantile", "mulaw"]), _fit_data(MODERATE),
    BIN_BAD)


def check_discrete(n, values):
    tok = DiscreteTokenizer(n)
    ok = all(isinstance(v, int) and 0 <= v < n for v in values) or (
        all(isinstance(v, float) and math.isfinite(v) and v == int(v) and 0 <= v < n
            for v in values))
    mixed_types = len({type(v) for v in values}) > 1
    try:
        ids = tok.encode(np.asarray(values) if values else np.zeros(0, np.int64))
    except ValueError as err:
        _clean(err)
        assert not ok or mixed_types, values
        return
    assert ok or mixed_types, f"accepted invalid actions {values!r}"
    assert ids.shape == (1, len(values)) and ids.dtype == torch.int64
    assert ((ids >= 0) & (ids < n)).all()
    assert tok.decode(ids).tolist() == [int(v) for v in values]


test_discrete, test_discrete_slow = _pair(
    check_discrete, st.integers(1, 50),
    st.one_of(st.lists(st.integers(), max_size=20), st.lists(st.floats(), max_size=20)))


# ----------------------------------------------------------------------------- pixel tokenizer


@st.composite
def pixel_cases(draw):
    color = draw(st.sampled_from(["gray", "channels"]))
    channels = 1 if color == "gray" else 3
    h, w = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    levels = draw(st.sampled_from([256, 2, 17, draw(st.integers(2, 256))]))
    tok = PixelTokenizer([h, w], channels, levels, color, row_end=draw(st.booleans()),
                         size_tokens=draw(st.booleans()))
    img = draw(hnp.arrays(np.uint8, (channels, h, w)))
    return tok, torch.from_numpy(img)


def check_pixel_roundtrip(case):
    tok, img = case
    ids = tok.encode(img)
    assert ids.shape == (tok.layout.length,)
    assert ((ids >= 0) & (ids < tok.vocab_size)).all()
    out = tok.decode(ids)
    assert out.dtype == torch.uint8 and out.shape == img.shape
    diff = (out.int() - img.int()).abs()
    if tok.levels == 256:
        assert torch.equal(out, img)
    else:
        assert diff.max() <= math.ceil(255 / (tok.levels - 1) / 2)


def check_pixel_bad(case, bad):
    tok, img = case
    if bad == "dtype_f":
        x = img.float()
    elif bad == "dtype_i":
        x = img.long()
    elif bad == "taller":
        x = torch.zeros(img.shape[0], img.shape[1] + 1, img.shape[2], dtype=torch.uint8)
    elif bad == "channels":
        x = torch.zeros(2, *img.shape[1:], dtype=torch.uint8)
    else:  # flat
        x = img.reshape(-1)
    with pytest.raises(ValueError, match=r"\S"):
        tok.encode(x)


def check_pixel_decode_any(case, ids):
    tok, _ = case
    try:
        out = tok.decode(torch.tensor(ids, dtype=torch.int64))
    except ValueError as err:
        _clean(err)
        return
    assert len(ids) == tok.layout.length and out.dtype == torch.uint8
    assert torch.equal(tok.encode(out), torch.tensor(ids)) or tok.levels != 256


test_pixel_roundtrip, test_pixel_roundtrip_slow = _pair(check_pixel_roundtrip, pixel_cases())
test_pixel_bad_input, test_pixel_bad_input_slow = _pair(
    check_pixel_bad, pixel_cases(),
    st.sampled_from(["dtype_f", "dtype_i", "taller", "channels", "flat"]))
test_pixel_decode_any, test_pixel_decode_any_slow = _pair(
    check_pixel_decode_any, pixel_cases(), st.lists(st.integers(-2, 270), max_size=60))


# ----------------------------------------------------------------------------- TokenSpace

NAMES = ["text", "image", "audio", "action"]


@st.composite
def spaces(draw):
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))
    modalities = {m: draw(st.integers(1, 50)) for m in names}
    marked = draw(st.lists(st.sampled_from(names), unique=True))
    markers = {m: (f"<b_{m}>", f"<e_{m}>") for m in marked}
    return TokenSpace(modalities, markers or None)


@st.composite
def space_and_segments(draw):
    space = draw(spaces())
    segs = []
    for _ in range(draw(st.integers(0, 6))):
        m = draw(st.sampled_from(list(space.modalities)))
        ids = draw(st.lists(st.integers(0, space.modalities[m] - 1), max_size=8))
        segs.append((m, torch.tensor(ids, dtype=torch.int64)))
    return space, segs, draw(st.booleans()), draw(st.booleans())


def _expected_split(space, segments):
    """What split promises: marked segments as given; unmarked runs merged by modality."""
    out: list[tuple[str, list[int], bool]] = []
    for m, ids in segments:
        marked = m in space.markers
        ids = ids.tolist()
        if marked:
            out.append((m, ids, True))
        elif ids:
            if out and not out[-1][2] and out[-1][0] == m and out[-1][1] is not None:
                out[-1] = (m, out[-1][1] + ids, False)
            else:
                out.append((m, ids, False))
        # An empty unmarked segment leaves no ids; it neither splits nor merges runs.
    return [(m, ids) for m, ids, _ in out]


def check_space_pack_split(case):
    space, segments, bos, eos = case
    packed = space.pack(segments, bos=bos, eos=eos)
    assert packed.dtype == torch.int64 and packed.ndim == 1
    assert ((packed >= 0) & (packed < space.vocab_size)).all()
    n_markers = sum(2 for m, _ in segments if m in space.markers)
    assert len(packed) == bos + eos + n_markers + sum(len(ids) for _, ids in segments)
    got = [(m, ids.tolist()) for m, ids in space.split(packed)]
    assert got == _expected_split(space, segments)
    # to_global / to_local are inverses on every segment.
    for m, ids in segments:
        assert torch.equal(space.to_local(m, space.to_global(m, ids)), ids)


def check_space_bad_ids(space, data):
    bad = data.draw(st.one_of(st.integers(max_value=-1), st.integers(min_value=space.vocab_size)))
    good = data.draw(st.lists(st.integers(0, space.vocab_size - 1), max_size=10))
    pos = data.draw(st.integers(0, len(good)))
    ids = good[:pos] + [bad] + good[pos:]
    assume(-2**63 <= bad < 2**63)
    with pytest.raises(ValueError, match="outside"):
        space.split(torch.tensor(ids, dtype=torch.int64))
    m = data.draw(st.sampled_from(list(space.modalities)))
    local_bad = data.draw(st.one_of(st.integers(-2**62, -1),
                                    st.integers(space.modalities[m], 2**62)))
    with pytest.raises(ValueError, match="outside"):
        space.pack([(m, torch.tensor([local_bad]))])
    with pytest.raises(ValueError, match="outside"):
        space.to_global(m, [local_bad])


def check_space_dict_roundtrip(space):
    d = json.loads(json.dumps(space.to_dict()))
    again = TokenSpace.from_dict(d)
    assert again.modalities == space.modalities
    assert again.markers == space.markers
    assert again.vocab_size == space.vocab_size
    assert again.special_ids == space.special_ids
    for m in space.modalities:
        assert again.offset(m) == space.offset(m)
    d["vocab_size"] += 1
    with pytest.raises(ValueError, match="mismatch"):
        TokenSpace.from_dict(d)


def check_space_construct_any(modalities, markers):
    try:
        space = TokenSpace(modalities, markers)
    except ValueError as err:
        _clean(err)
        return
    assert space.vocab_size == 3 + 2 * len(space.markers) + sum(modalities.values())
    assert len(set(space.special_ids.values())) == len(space.special_ids)


SIZES = st.one_of(st.integers(-3, 60), st.booleans(), st.floats(-2, 5), st.none(), st.text())
test_space_pack_split, test_space_pack_split_slow = _pair(
    check_space_pack_split, space_and_segments())
test_space_bad_ids, test_space_bad_ids_slow = _pair(check_space_bad_ids, spaces(), st.data())
test_space_dict_roundtrip, test_space_dict_roundtrip_slow = _pair(
    check_space_dict_roundtrip, spaces())
test_space_construct_any, test_space_construct_any_slow = _pair(
    check_space_construct_any, st.dictionaries(st.sampled_from(NAMES + ["x"]), SIZES, max_size=4),
    st.one_of(st.none(), st.dictionaries(
        st.sampled_from(NAMES + ["zzz"]),
        st.lists(st.sampled_from(["<a>", "<b>", "<pad>", "<eos>", "<c>"]), max_size=3)
        .map(tuple), max_size=3)))


# ----------------------------------------------------------------------------- DecodingConfig

NUMERIC_FIELDS = ["max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p",
                  "typical_p", "repetition_penalty", "presence_penalty", "frequency_penalty",
                  "no_repeat_ngram_size", "num_return_sequences", "seed", "num_beams",
                  "length_penalty", "top_logprobs", "cfg_scale", "num_draft_tokens",
                  "draft_confidence", "prompt_lookup_max_ngram"]
OTHER_FIELDS = ["strategy", "early_stopping", "beam_length", "use_cache", "compile",
                "speculative", "adaptive_draft", "stop_token_ids", "banned_token_ids",
                "allowed_token_ids", "stop_sequences", "stop_strings"]

SMALL_NUMBERS = st.one_of(
    st.integers(-3, 300), st.floats(-3, 3), st.floats(allow_nan=True, allow_infinity=True),
    st.none(), st.booleans(), st.sampled_from([0, 1, 0.5, 1.0, 2, 1e-9, -0.0]),
    st.fractions(max_denominator=10).filter(lambda f: abs(f) < 100),
    st.integers(-3, 20).map(np.int64), st.floats(-3, 3).map(np.float64))
ODD_VALUES = st.one_of(
    st.text(max_size=6), st.sampled_from(["greedy", "sample", "beam", "never", "hf",
                                          "generated", "draft", "prompt_lookup"]),
    st.lists(st.one_of(st.integers(-2, 50), st.text(max_size=2),
                       st.lists(st.integers(-1, 9), max_size=3)), max_size=4),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), st.binary(max_size=3))


def check_decoding_config(kwargs):
    try:
        cfg = DecodingConfig(**kwargs)
    except ValueError as err:
        _clean(err)
        assert "invalid DecodingConfig" in str(err)
        return
    # Constructed: the documented ranges hold.
    assert cfg.max_new_tokens >= 1 and 0 <= cfg.min_new_tokens <= cfg.max_new_tokens
    assert cfg.temperature >= 0 and cfg.repetition_penalty > 0
    for name in ("top_p", "typical_p"):
        value = getattr(cfg, name)
        assert value is None or 0 < value <= 1
    assert cfg.min_p is None or 0 <= cfg.min_p <= 1
    assert cfg.top_k is None or cfg.top_k >= 1
    assert cfg.num_beams >= 1 and (cfg.strategy == "beam" or cfg.num_beams == 1)
    assert 0 <= cfg.draft_confidence <= 1
    for name in ("presence_penalty", "frequency_penalty", "length_penalty", "cfg_scale"):
        assert math.isfinite(getattr(cfg, name))
    hash(cfg)  # frozen configs stay hashable


DECODING_KWARGS = st.fixed_dictionaries({}, optional={
    **{f: SMALL_NUMBERS for f in NUMERIC_FIELDS},
    **{f: st.one_of(ODD_VALUES, SMALL_NUMBERS) for f in OTHER_FIELDS}})
test_decoding_config, test_decoding_config_slow = _pair(
    check_decoding_config, DECODING_KWARGS, fast=50)

HUGE = st.one_of(st.integers(min_value=10**309, max_value=10**400).map(lambda v: v),
                 st.just(Fraction(10**400, 3)))
test_decoding_config_huge, test_decoding_config_huge_slow = _pair(
    check_decoding_config,
    st.tuples(st.sampled_from(["presence_penalty", "frequency_penalty", "length_penalty",
                               "cfg_scale"]), HUGE).map(lambda t: {t[0]: t[1]}))


# ----------------------------------------------------------------------------- episode files


@functools.lru_cache(maxsize=1)
def _episode_bytes() -> bytes:
    ep = Episode(np.arange(12, dtype=np.float32).reshape(4, 3), np.array([0, 1, 1, 0]),
                 np.ones(4, np.float32), {"env_id": "CartPole-v1", "seed": 3})
    with tempfile.TemporaryDirectory() as tmp:
        return save_episode(Path(tmp) / "ep.npz", ep).read_bytes()


def _load_episode_bytes(blob: bytes):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "episode_x.npz"
        path.write_bytes(blob)
        try:
            return load_episode(path), None
        except Exception as err:  # noqa: BLE001 - classified below
            return None, err


def _assert_clean_episode_error(err):
    _clean(err)
    # load_episode documents "ValueError naming the file"
    assert "episode_x.npz" in str(err), f"error does not name the file: {err}"


def check_episode_truncated(cut):
    blob = _episode_bytes()
    assume(cut < len(blob))
    ep, err = _load_episode_bytes(blob[:cut])
    assert ep is None, "a truncated episode file loaded"
    _assert_clean_episode_error(err)


def check_episode_random_bytes(blob):
    ep, err = _load_episode_bytes(blob)
    assert ep is None
    _assert_clean_episode_error(err)


def _zip_flag_bytes(blob: bytes) -> list[int]:
    """Offsets of the zip flag and compression-method bytes (local and central headers)."""
    out = []
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = blob.find(sig)
        while i >= 0:
            out.extend(range(i + off, i + off + 4))
            i = blob.find(sig, i + 1)
    return out


def check_episode_corrupted(flips):
    blob = bytearray(_episode_bytes())
    flags = set(_zip_flag_bytes(bytes(blob)))  # test_episode_zip_flags covers these
    for pos, value in flips:
        if pos % len(blob) not in flags:
            blob[pos % len(blob)] = value
    ep, err = _load_episode_bytes(bytes(blob))
    if err is None:  # a flip the format cannot detect: the episode must still be consistent
        assert ep.length >= 1 and np.isfinite(ep.observations).all()
        return
    _assert_clean_episode_error(err)


test_episode_truncated, test_episode_truncated_slow = _pair(
    check_episode_truncated, st.integers(0, 2000))
RANDOM_FILES = st.one_of(st.binary(max_size=200),
                        st.binary(max_size=60).map(lambda b: b"PK\x03\x04" + b))
FLIPS = st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 255)), min_size=1, max_size=4)
test_episode_random_bytes, test_episode_random_bytes_slow = _pair(
    check_episode_random_bytes, RANDOM_FILES)
test_episode_corrupted, test_episode_corrupted_slow = _pair(check_episode_corrupted, FLIPS)
def check_episode_zip_flags(index, value):
    blob = bytearray(_episode_bytes())
    flags = _zip_flag_bytes(bytes(blob))
    blob[flags[index % len(flags)]] = value
    ep, err = _load_episode_bytes(bytes(blob))
    if ep is None:  # a flag the reader honours ("encrypted", unknown method): a clean refusal
        _assert_clean_episode_error(err)
    else:  # a flag it ignores: the episode, intact
        np.testing.assert_array_equal(ep.observations, np.arange(12).reshape(4, 3))


test_episode_zip_flags, test_episode_zip_flags_slow = _pair(
    check_episode_zip_flags, st.integers(0, 100), st.integers(0, 127).map(lambda v: 2 * v + 1))

ARRAY_DTYPES = st.sampled_from([np.float32, np.float64, np.int64, np.int8, np.bool_,
                                np.uint16, np.complex64, "U3", "S2", "M8[s]"])


@st.composite
def episode_fields(draw):
    """Arrays for the three fields: some the right shape, some wrong (shape or dtype)."""
    t = draw(st.integers(0, 4))

    def arr(default_shape):
        shape = draw(st.one_of(st.just(default_shape),
                               hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)))
        dtype = draw(st.one_of(st.just(np.float32), ARRAY_DTYPES))
        return draw(hnp.arrays(dtype, shape))

    fields = {"observations": arr((t, 2)), "actions": arr((t,)), "rewards": arr((t,))}
    meta = draw(st.one_of(st.just('{"env_id": "X-v0"}'), st.text(max_size=8),
                          st.just("[1, 2]"), st.just('{"env_id": "X-v0", "path": 3}')))
    return fields, meta


def check_episode_wrong_fields(case):
    fields, meta = case
    buf = io.BytesIO()
    np.savez(buf, meta=meta, **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep, err = _load_episode_bytes(buf.getvalue())
    if err is not None:
        _assert_clean_episode_error(err)
        return
    # Loaded: it must be a valid episode whose values are those in the file, as the documented
    # dtypes hold them (float32 observations / rewards / continuous actions, int64 discrete).
    t = ep.length
    assert t >= 1 and ep.observations.shape[0] == t and ep.actions.shape[0] == t
    assert ep.rewards.shape == (t,) and ep.observations.ndim == 2
    for name in ("observations", "actions", "rewards"):
        raw = fields[name]
        assert raw.dtype.kind in "biuf", f"{name} of dtype {raw.dtype} accepted"
        loaded = getattr(ep, name)
        assert np.array_equal(loaded, raw.astype(loaded.dtype)), f"{name} changed on load"
        assert np.allclose(loaded, raw, rtol=1e-6, atol=1e-30), f"{name} changed on load"


test_episode_wrong_fields, test_episode_wrong_fields_slow = _pair(
    check_episode_wrong_fields, episode_fields(), fast=40)


def test_episode_float64_beyond_float32():
    """A finite float64 reward just past float32's largest value (the minimal example of
    test_episode_wrong_fields_slow) loaded as inf. It must be refused, naming the file."""
    buf = io.BytesIO()
    np.savez(buf, meta='{"env_id": "X-v0"}', observations=np.zeros((1, 2), np.float32),
             actions=np.zeros(1, np.float32), rewards=np.array([3.40282357e+38]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep, err = _load_episode_bytes(buf.getvalue())
    assert ep is None, f"loaded as rewards {ep.rewards}"
    _assert_clean_episode_error(err)


# ----------------------------------------------------------------------------- audio files


@functools.lru_cache(maxsize=4)
def _wav_bytes(subtype: str) -> bytes:
    t = np.arange(400) / 8000
    wave = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.cos(2 * np.pi * 220 * t)], 1)
    buf = io.BytesIO()
    sf.write(buf, wave.astype(np.float32), 8000, subtype=subtype, format="WAV")
    return buf.getvalue()


def _read_wav_bytes(blob: bytes, sample_rate: int | None):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "clip_x.wav"
        path.write_bytes(blob)
        try:
            if sample_rate is None:
                return read_native(path)[0], None
            return read_audio(path, sample_rate), None
        except Exception as err:  # noqa: BLE001 - classified below
            return None, err


def _assert_audio_result(wave, err, max_len=None):
    if err is not None:
        _clean(err)  # read_native documents ValueError naming the file
        assert "clip_x.wav" in str(err), f"error does not name the file: {err}"
        return
    assert wave.dtype == torch.float32 and wave.ndim == 1 and len(wave) >= 1
    assert torch.isfinite(wave).all(), "non-finite samples"
    if max_len is not None:
        assert len(wave) <= max_len


def check_wav_truncated(subtype, cut, sample_rate):
    blob = _wav_bytes(subtype)
    wave, err = _read_wav_bytes(blob[:cut], sample_rate)
    max_len = None if sample_rate not in (None, 8000) else 400
    _assert_audio_result(wave, err, max_len)
    if wave is not None and sample_rate is not None:
        assert ((wave >= -1) & (wave <= 1)).all()


def check_wav_random(blob, sample_rate):
    wave, err = _read_wav_bytes(blob, sample_rate)
    _assert_audio_result(wave, err)


def check_wav_corrupted(subtype, flips, sample_rate):
    blob = bytearray(_wav_bytes(subtype))
    for pos, value in flips:
        blob[pos % 64] = value  # the header region: format, channels, rate, sizes
    wave, err = _read_wav_bytes(bytes(blob), sample_rate)
    _assert_audio_result(wave, err)


RATES = st.sampled_from([None, 8000, 16000])
test_wav_truncated, test_wav_truncated_slow = _pair(
    check_wav_truncated, st.sampled_from(["PCM_16", "FLOAT"]), st.integers(0, 1700), RATES)
test_wav_random_bytes, test_wav_random_bytes_slow = _pair(
    check_wav_random,
    st.one_of(st.binary(max_size=100),
              st.binary(max_size=60).map(lambda b: b"RIFF\x24\x00\x00\x00WAVEfmt " + b)),
    RATES)
test_wav_corrupted_header, test_wav_corrupted_header_slow = _pair(
    check_wav_corrupted, st.sampled_from(["PCM_16", "FLOAT"]),
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 255)), min_size=1, max_size=3), RATES,
    # Finding: a rate of 204609 Hz (bytes 24 and 26) made resampling to 16 kHz build a 13 GB
    # kernel (RuntimeError, or the machine swapping); a rate of 1 Hz, 16000 samples per sample.
    examples=[("PCM_16", [(24, 0x41), (26, 3)], 16000), ("FLOAT", [(24, 1), (25, 0)], 16000)])


def check_wav_any_rate(subtype, rate, sample_rate):
    """Any rate in the header: refused naming the file and the allowed range, or read (and
    resampled) to exactly the documented length, quickly."""
    blob = bytearray(_wav_bytes(subtype))
    blob[24:28] = struct.pack("<I", rate)
    t0 = time.perf_counter()
    wave, err = _read_wav_bytes(bytes(blob), sample_rate)
    assert time.perf_counter() - t0 < 10, f"reading a {rate} Hz file took too long"
    lo, hi = audio_data.NATIVE_RATES
    if not lo <= rate <= hi:
        assert err is not None, f"a {rate} Hz file was read"
        _assert_audio_result(wave, err)
        assert "sample rate" in str(err) or "cannot read" in str(err), err
        return
    assert err is None, err
    expected = 400 if sample_rate is None else math.ceil(400 * sample_rate / rate)
    assert len(wave) == expected
    _assert_audio_result(wave, err)
    assert ((wave >= -1) & (wave <= 1)).all()


test_wav_any_rate, test_wav_any_rate_slow = _pair(
    check_wav_any_rate, st.sampled_from(["PCM_16", "FLOAT"]),
    st.one_of(st.integers(0, 2**32 - 1), st.integers(900, 800_000),
              st.sampled_from([1, 999, 1000, 8001, 11025, 44101, 767999, 768000, 768001])),
    RATES, examples=[("PCM_16", 204609, 16000), ("PCM_16", 44101, 8000)])

COMMON_RATES = st.sampled_from([8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])


def check_resample_direct_matches_torchaudio(rates, n, seed):
    """The direct path (rates with a huge polyphase kernel) computes torchaudio's resample."""
    rate, sample_rate = rates
    wave = torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.3
    ref = AF.resample(wave.double(), rate, sample_rate)  # float64: its own rounding is ~1e-4
    got = audio_data._resample_direct(wave, rate, sample_rate)
    assert got.dtype == wave.dtype and len(got) == math.ceil(n * sample_rate / rate)
    assert len(ref) == len(got)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)


test_resample_direct, test_resample_direct_slow = _pair(
    check_resample_direct_matches_torchaudio,
    st.one_of(st.lists(COMMON_RATES, min_size=2, max_size=2, unique=True).map(tuple),
              st.lists(st.integers(50, 500), min_size=2, max_size=2, unique=True).map(tuple)),
    st.integers(1, 1000), st.integers(0, 2**16), fast=15)


def test_resample_coprime_rates_is_fast_and_right():
    """44101 -> 16000 Hz (gcd 1): torchaudio's kernel would be 16000 x 44113 elements."""
    assert audio_data._kernel_size(44101, 16000) > audio_data._MAX_KERNEL
    t = torch.arange(44101 * 2, dtype=torch.float64) / 44101
    waves = [(0.5 * torch.sin(2 * math.pi * 440 * t)).float(), torch.zeros(3)]
    t0 = time.perf_counter()
    out, short = resample_many(waves, 44101, 16000)
    assert time.perf_counter() - t0 < 5
    assert len(out) == math.ceil(len(t) * 16000 / 44101) and len(short) == 2
    expect = 0.5 * torch.sin(2 * math.pi * 440 * torch.arange(len(out)) / 16000)
    torch.testing.assert_close(out[100:-100], expect[100:-100].float(), atol=2e-3, rtol=0)


# ----------------------------------------------------------------------------- run directories


@functools.lru_cache(maxsize=1)
def _run_files() -> dict[str, bytes]:
    torch.manual_seed(0)
    tok = ByteTokenizer()
    space = TokenSpace.for_tokenizers(tok)
    model = Transformer(ModelConfig(vocab_size=space.vocab_size, n_layer=1, n_head=2,
                                    d_model=16, max_seq_len=8))
    with tempfile.TemporaryDirectory() as tmp:
        run = save_run(Path(tmp) / "run", model, space, tok)
        return {p.name: p.read_bytes() for p in run.iterdir()}


def _load_run_with(config: bytes | None = None, weights: bytes | None = None):
    files = dict(_run_files())
    if config is not None:
        files["config.json"] = config
    if weights is not None:
        files["model.safetensors"] = weights
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run_x"
        run.mkdir()
        for name, blob in files.items():
            (run / name).write_bytes(blob)
        try:
            return load_run(run), None
        except Exception as err:  # noqa: BLE001 - classified below
            return None, err


def _assert_clean_run_error(err):
    assert isinstance(err, (ValueError, FileNotFoundError)), \
        f"unclean {type(err).__name__}: {err}"
    assert str(err).strip()


def check_run_config_truncated(cut):
    blob = _run_files()["config.json"]
    assume(cut < len(blob.rstrip()))
    loaded, err = _load_run_with(config=blob[:cut])
    assert loaded is None
    _assert_clean_run_error(err)


def check_run_weights_truncated(cut):
    blob = _run_files()["model.safetensors"]
    assume(cut < len(blob))
    loaded, err = _load_run_with(weights=blob[:cut])
    assert loaded is None
    _assert_clean_run_error(err)


def check_run_config_any_json(value):
    loaded, err = _load_run_with(config=json.dumps(value).encode())
    assert loaded is None
    _assert_clean_run_error(err)


def check_run_config_corrupted(flips):
    blob = bytearray(_run_files()["config.json"])
    for pos, value in flips:
        blob[pos % len(blob)] = value
    loaded, err = _load_run_with(config=bytes(blob))
    if err is not None:
        _assert_clean_run_error(err)


test_run_config_truncated, test_run_config_truncated_slow = _pair(
    check_run_config_truncated, st.integers(0, 3000))
test_run_weights_truncated, test_run_weights_truncated_slow = _pair(
    check_run_weights_truncated, st.integers(0, 20000), fast=25)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=4),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=4), kids,
                                                              max_size=3), max_leaves=6)
test_run_config_any_json, test_run_config_any_json_slow = _pair(
    check_run_config_any_json, JSON_VALUES)
test_run_config_corrupted, test_run_config_corrupted_slow = _pair(
    check_run_config_corrupted,
    st.lists(st.tuples(st.integers(0, 3000), st.integers(32, 126)), min_size=1, max_size=3))

SAFETENSORS_DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32",
                      "U16", "U8", "BOOL"]


@functools.lru_cache(maxsize=1)
def _run_weights() -> dict[str, torch.Tensor]:
    loaded, err = _load_run_with()
    assert err is None, err
    return {k: v.clone() for k, v in loaded.model.state_dict().items()}


def _with_header(blob: bytes, header: dict) -> bytes:
    """`blob` (safetensors) with its JSON header replaced, padded to 8 bytes as the format does."""
    size = int.from_bytes(blob[:8], "little")
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + blob[8 + size:]


def check_run_weights_header(index, dtype, shape):
    """Any dtype (and maybe shape) in the weights' header for one tensor: a clean refusal, or
    exactly the saved weights (never the stored bytes cast into wrong values)."""
    blob = _run_files()["model.safetensors"]
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    name = sorted(k for k in header if k != "__metadata__")[index % (len(header) - 1)]
    header[name]["dtype"] = dtype
    if shape is not None:
        header[name]["shape"] = shape
    loaded, err = _load_run_with(weights=_with_header(blob, header))
    if err is not None:
        _assert_clean_run_error(err)
        return
    state = loaded.model.state_dict()
    assert state.keys() == _run_weights().keys()
    for key, value in _run_weights().items():
        assert torch.equal(state[key], value), f"{key} loaded changed ({name} stored as {dtype})"


test_run_weights_header, test_run_weights_header_slow = _pair(
    check_run_weights_header, st.integers(0, 100), st.sampled_from(SAFETENSORS_DTYPES),
    st.one_of(st.none(), st.lists(st.integers(0, 300), max_size=3)),
    # Finding: float32 weights stored as I32 (the same bytes) loaded as their int values cast.
    examples=[(0, "I32", None), (3, "U32", None)])
