import inspect
import json
import pathlib
import sysconfig
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from armodal.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    TokenSpace,
    TrainableTokenizer,
    check_tokenizer,
    tokenizer_from_config,
)

UNICODE_SAMPLES = ["", "a", "héllo wörld", "emoji 🎉👩‍👩‍👧 and 漢字", "tabs\tand\r\nnewlines\n\x00", "  leading spaces", "ü" * 50]


def _corpus() -> list[str]:
    texts = [inspect.getsource(json), inspect.getsource(inspect)[:20_000]]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts += [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(stdlib.glob("json/*.py"))]
    return texts


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return _corpus()


@pytest.fixture(scope="module")
def bpe(corpus) -> BPETokenizer:
    tok = BPETokenizer(vocab_size=600)
    tok.fit(corpus)
    return tok


@pytest.fixture(scope="module")
def char(corpus) -> CharTokenizer:
    tok = CharTokenizer()
    tok.fit(corpus)
    return tok


# ---------------------------------------------------------------- conformance


def test_conformance_byte(corpus):
    check_tokenizer(ByteTokenizer(), UNICODE_SAMPLES + [corpus[0][:3000]])


def test_conformance_char(char, corpus):
    check_tokenizer(char, [corpus[0][:3000], "", "def f(x):\n    return x\n"])


def test_conformance_bpe(bpe, corpus):
    check_tokenizer(bpe, UNICODE_SAMPLES + [corpus[0][:3000]])


def test_protocols():
    assert isinstance(ByteTokenizer(), Tokenizer)
    assert not isinstance(ByteTokenizer(), TrainableTokenizer)
    assert isinstance(CharTokenizer(), TrainableTokenizer)
    assert isinstance(BPETokenizer(), TrainableTokenizer)
    assert not isinstance(object(), Tokenizer)


class _DropsLastChar(ByteTokenizer):
    def decode(self, ids):
        return super().decode(ids)[:-1]


class _OutOfRange(ByteTokenizer):
    vocab_size = 100  # bytes >= 100 fall outside


class _Int32(ByteTokenizer):
    def encode(self, sample):
        return super().encode(sample).to(torch.int32)


class _ShiftedByte(ByteTokenizer):
    """Self-consistent but its config rebuilds a plain ByteTokenizer, which encodes differently."""

    def encode(self, sample):
        return (super().encode(sample) + 1) % 256

    def decode(self, ids):
        return super().decode((torch.as_tensor(ids) - 1) % 256)

    def config(self):
        return ByteTokenizer().config()


class _Random(ByteTokenizer):
    def encode(self, sample):
        return torch.randint(0, 256, (len(sample) + 5,))


@pytest.mark.parametrize(
    "tok, match",
    [
        (_DropsLastChar(), "decode\\(encode\\(x\\)\\) != x"),
        (_OutOfRange(), r"outside \[0, 100\)"),
        (_Int32(), "int64"),
        (_ShiftedByte(), "rebuilt from config"),
        (_Random(), "not deterministic"),
    ],
)
def test_check_tokenizer_catches_broken(tok, match):
    with pytest.raises(AssertionError, match=match):
        check_tokenizer(tok, ["hello", "wörld"])


def test_check_tokenizer_rejects_non_tokenizer_and_foreign_config():
    with pytest.raises(AssertionError, match="protocol"):
        check_tokenizer(object(), ["x"])
    # A correct tokenizer defined outside armodal cannot be rebuilt from its config.
    class Local(ByteTokenizer):
        pass

    with pytest.raises(AssertionError, match="does not rebuild"):
        check_tokenizer(Local(), ["x"])


def test_lossless_false_skips_round_trip():
    class Lossy(_DropsLastChar):
        lossless = False

    with pytest.raises(AssertionError, match="does not rebuild"):  # config check still runs
        check_tokenizer(Lossy(), ["abc"])


# ---------------------------------------------------------------- config round trip


@pytest.mark.parametrize(
    "target", ["os.system", "builtins.eval", "armodalx.tokenizers.text.ByteTokenizer", "subprocess.Popen", ""]
)
def test_from_config_refuses_foreign_targets(target):
    with pytest.raises(ValueError, match="refusing") as e:
        tokenizer_from_config({"target": target, "init": {"command": "echo pwned"}, "state": {}})
    assert repr(target) in str(e.value)


@pytest.mark.parametrize(
    "target", ["armodal.tokenizers.base.importlib", "armodal.tokenizers.text.np", "armodal.tokenizers.text._HFTokenizer",
               "armodal.tokenizers.text.NoSuchThing", "armodal.nosuchmodule.X"]
)
def test_from_config_refuses_non_armodal_classes(target):
    with pytest.raises(ValueError, match=target.replace(".", r"\.")):
        tokenizer_from_config({"target": target, "init": {}, "state": {}})


def test_config_round_trip_through_json(bpe, char):
    for tok in (ByteTokenizer(), char, bpe):
        cfg = json.loads(json.dumps(tok.config()))
        assert cfg["target"] == f"armodal.tokenizers.text.{type(tok).__name__}"
        rebuilt = tokenizer_from_config(cfg)
        assert type(rebuilt) is type(tok) and rebuilt.vocab_size == tok.vocab_size
    assert bpe.config()["init"] == {"vocab_size": 600, "min_frequency": 2}
    unfitted = tokenizer_from_config(BPETokenizer(1000).config())
    assert not unfitted.is_fitted and unfitted.vocab_size == 1000


# ---------------------------------------------------------------- text tokenizers


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text())
@example("👩‍👩‍👧 🎉 \U0010ffff \x00 é")
def test_byte_and_bpe_lossless_on_any_unicode(bpe, s):
    for tok in (ByteTokenizer(), bpe):
        ids = tok.encode(s)
        assert ids.dtype == torch.int64 and ids.ndim == 1
        assert ids.numel() == 0 or 0 <= int(ids.min()) <= int(ids.max()) < tok.vocab_size
        assert tok.decode(ids) == s
    assert ByteTokenizer().encode(s).numel() == ByteTokenizer().count_units(s) == len(s.encode("utf-8"))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.text(min_size=1), min_size=1, max_size=4))
def test_char_fits_any_unicode(samples):
    tok = CharTokenizer()
    tok.fit(samples)
    assert tok.vocab_size == len(set("".join(samples)))
    for s in samples:
        assert tok.decode(tok.encode(s)) == s


def test_byte_decode_never_raises_on_invalid_utf8():
    assert ByteTokenizer().decode(torch.tensor([104, 0xC3, 255, 105])) == "h\ufffd\ufffdi"
    with pytest.raises(ValueError, match="256"):
        ByteTokenizer().decode(torch.tensor([256]))


def test_char_unknown_character_error(char):
    with pytest.raises(ValueError) as e:
        char.encode("abc✓ def🎉")
    msg = str(e.value)
    assert repr("✓") in msg and repr("🎉") in msg
    assert f"{char.vocab_size} characters" in msg and "fitted from the training corpus" in msg


def test_char_state_and_use_before_fit():
    tok = CharTokenizer()
    assert not tok.is_fitted
    with pytest.raises(RuntimeError, match="fit"):
        tok.encode("a")
    tok.fit(["cab", "bad"])
    assert tok.state_dict() == {"alphabet": "abcd"} and tok.vocab_size == 4
    assert tok.encode("dcba").tolist() == [3, 2, 1, 0]
    assert CharTokenizer(alphabet="dcba").encode("abcd").tolist() == [0, 1, 2, 3]
    assert tok.count_units("é") == 2  # bytes, not characters


def test_char_encode_fast_on_1mb(corpus):
    text = ("".join(corpus) * 20)[:1_000_000]
    tok = CharTokenizer()
    tok.fit([text])
    t0 = time.perf_counter()
    ids = tok.encode(text)
    elapsed = time.perf_counter() - t0
    assert ids.numel() == len(text) and tok.decode(ids) == text
    assert elapsed < 0.5, f"CharTokenizer.encode took {elapsed:.2f}s on 1 MB"


def test_bpe_adds_no_special_tokens_and_learns_merges(bpe, corpus):
    assert bpe.vocab_size == bpe._tok.get_vocab_size() > 256
    assert bpe.encode("").numel() == 0
    assert bpe.encode("a").tolist() == [bpe._tok.token_to_id("a")]
    assert bpe.decode(bpe.encode(" ")) == " "
    assert len(bpe._tok.get_added_tokens_decoder()) == 0
    text = corpus[0][:5000]
    assert bpe.encode(text).numel() < 0.6 * bpe.count_units(text)  # merges actually compress


def test_bpe_encode_batch_matches_encode(bpe):
    batch = bpe.encode_batch(UNICODE_SAMPLES)
    assert len(batch) == len(UNICODE_SAMPLES)
    for s, ids in zip(UNICODE_SAMPLES, batch):
        assert torch.equal(ids, bpe.encode(s)) and ids.dtype == torch.int64


def test_bpe_state_dict_round_trip_and_unfitted(bpe):
    with pytest.raises(RuntimeError, match="not fitted"):
        BPETokenizer().encode("x")
    other = BPETokenizer()
    other.load_state_dict(json.loads(json.dumps(bpe.state_dict())))
    assert other.vocab_size == bpe.vocab_size
    assert torch.equal(other.encode("import json\n"), bpe.encode("import json\n"))
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer(vocab_size=100)


# ---------------------------------------------------------------- TokenSpace


@pytest.fixture
def space() -> TokenSpace:
    return TokenSpace({"text": 10, "image": 5}, markers={"image": ("<boi>", "<eoi>")})


def test_space_layout(space):
    assert (space.pad_id, space.bos_id, space.eos_id) == (0, 1, 2)
    assert space.special_ids == {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<boi>": 3, "<eoi>": 4}
    assert space.offset("text") == 5 and space.offset("image") == 15 and space.vocab_size == 20
    single = TokenSpace({"text": 256})
    assert single.offset("text") == 3 and single.vocab_size == 259


def test_space_unknown_modality_and_bad_sizes(space):
    with pytest.raises(ValueError, match=r"'audio'.*\['text', 'image'\]"):
        space.offset("audio")
    with pytest.raises(ValueError, match="'audio'"):
        TokenSpace({"text": 3}, markers={"audio": ("<boa>", "<eoa>")})
    with pytest.raises(ValueError, match="positive int"):
        TokenSpace({"text": 0})
    with pytest.raises(ValueError, match="used twice"):
        TokenSpace({"text": 3}, markers={"text": ("<bos>", "<x>")})


def test_space_to_global_to_local(space):
    assert space.to_global("image", torch.tensor([0, 4])).tolist() == [15, 19]
    assert space.to_local("image", torch.tensor([15, 19])).tolist() == [0, 4]
    with pytest.raises(ValueError, match=r"id 14 .*'image'.*\[15, 20\)"):
        space.to_local("image", torch.tensor([15, 14]))
    with pytest.raises(ValueError, match=r"id 5 .*\[0, 5\)"):
        space.to_global("image", torch.tensor([5]))


def test_space_modality_mask(space):
    m = space.modality_mask("text")
    assert m.dtype == torch.bool and m.shape == (20,)
    assert m.nonzero().flatten().tolist() == list(range(5, 15))
    m = space.modality_mask("image", include=["<eoi>", "<eos>"])
    assert m.nonzero().flatten().tolist() == [2, 4, 15, 16, 17, 18, 19]
    with pytest.raises(ValueError, match="<nope>"):
        space.modality_mask("image", include=["<nope>"])


def test_space_pack_split_two_modalities(space):
    segs = [("text", torch.tensor([0, 9])), ("image", torch.tensor([4, 0, 1])), ("image", torch.tensor([], dtype=torch.long)),
            ("text", torch.tensor([3]))]
    packed = space.pack(segs)
    assert packed.dtype == torch.int64
    assert packed.tolist() == [1, 5, 14, 3, 19, 15, 16, 4, 3, 4, 8, 2]
    out = space.split(packed)
    assert [m for m, _ in out] == ["text", "image", "image", "text"]
    for (_, ids), (_, ids2) in zip(out, segs):
        assert torch.equal(ids, ids2)
    assert space.pack(segs, bos=False, eos=False).tolist() == packed.tolist()[1:-1]


def test_space_split_unmarked_runs_and_truncation(space):
    # image ids outside markers group into runs by modality; pad/bos/eos are dropped
    ids = [1, 5, 6, 15, 16, 7, 0, 0]
    assert [(m, t.tolist()) for m, t in space.split(ids)] == [("text", [0, 1]), ("image", [0, 1]), ("text", [2])]
    # generation cut off inside an image segment
    assert [(m, t.tolist()) for m, t in space.split([1, 3, 15, 18])] == [("image", [0, 3])]
    single = TokenSpace({"text": 256})
    assert [(m, t.tolist()) for m, t in single.split(single.pack([("text", [7, 8])]))] == [("text", [7, 8])]
    with pytest.raises(ValueError, match="20"):
        space.split([20])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["text", "image", "audio"]), st.lists(st.integers(0, 4), max_size=5)), max_size=6))
def test_space_pack_split_round_trip_property(segments):
    space = TokenSpace({"text": 5, "image": 5, "audio": 5}, markers={"image": ("<boi>", "<eoi>"), "audio": ("<boa>", "<eoa>")})
    out = space.split(space.pack([(m, torch.tensor(ids, dtype=torch.long)) for m, ids in segments]))
    # unmarked text segments merge with adjacent text and vanish when empty: that is the ambiguity pack leaves
    expected: list[tuple[str, list[int]]] = []
    for m, ids in segments:
        if m == "text" and expected and expected[-1][0] == "text":
            expected[-1][1].extend(ids)
        else:
            expected.append((m, list(ids)))
    expected = [(m, ids) for m, ids in expected if ids or m != "text"]
    assert [(m, t.tolist()) for m, t in out] == expected


def test_space_dict_round_trip_and_for_tokenizers(space, char):
    d = json.loads(json.dumps(space.to_dict()))
    again = TokenSpace.from_dict(d)
    assert again == space and again.special_ids == space.special_ids
    assert again.modality_mask("image").tolist() == space.modality_mask("image").tolist()
    s = TokenSpace.for_tokenizers(ByteTokenizer(), markers=None)
    assert s.modalities == {"text": 256}
    with pytest.raises(ValueError, match="'text'"):
        TokenSpace.for_tokenizers(ByteTokenizer(), char)
