"""StopChecker: stop tokens, stop sequences, stop strings and held-back streaming text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from armodal.generation.config import DecodingConfig
from armodal.generation.stopping import StopChecker
from armodal.tokenizers.text import ByteTokenizer

BYTES = ByteTokenizer()


def _decode_bytes(ids: list[int]) -> str:
    return BYTES.decode(ids)


def _feed(checker: StopChecker, row: int, tokens: list[int]) -> tuple[str | None, list[str]]:
    """Feed tokens until the row stops (or runs out: "length", as generate's last step does,
    with final=True); return the reason and the streamed pieces."""
    pieces = []
    for i, token in enumerate(tokens):
        reason = checker.update(row, token)
        last = reason is None and i == len(tokens) - 1
        pieces.append(checker.stream_text(row, final=last))
        if reason is not None:
            return reason, pieces
    return "length", pieces


def test_stop_token_is_kept_and_the_row_takes_no_more_tokens():
    checker = StopChecker(DecodingConfig(stop_token_ids=[7, 9]))
    assert [checker.update(0, t) for t in (1, 2, 9)] == [None, None, "stop_token"]
    assert checker.tokens(0) == [1, 2, 9] and checker.reason(0) == "stop_token"
    assert checker.reason(1) is None and checker.update(1, 3) is None  # rows are independent
    with pytest.raises(ValueError, match="already finished"):
        checker.update(0, 4)
    checker.reset(0)
    assert checker.update(0, 7) == "stop_token"


def test_stop_sequence_with_partial_overlap():
    checker = StopChecker(DecodingConfig(stop_sequences=[[5, 5, 6], [1, 2]]))
    # 5, 5, 5 is a false start of 5, 5, 6 that overlaps the real match.
    assert [checker.update(0, t) for t in (5, 5, 5, 6)] == [None, None, None, "stop_sequence"]
    assert checker.tokens(0) == [5, 5, 5, 6]
    assert [checker.update(1, t) for t in (2, 1, 3, 1, 2)] == [None] * 4 + ["stop_sequence"]


def test_stop_string_across_tokens_is_cut_and_held_back():
    checker = StopChecker(DecodingConfig(stop_strings=["END"]), _decode_bytes)
    streamed = []
    for char, reason, piece in [("a", None, "a"), ("E", None, ""), ("N", None, ""),
                                ("x", None, "ENx"),  # diverged: the held "EN" is released
                                ("E", None, ""), ("N", None, ""), ("D", "stop_string", "")]:
        assert checker.update(0, ord(char)) == reason
        streamed.append(checker.stream_text(0))
        assert streamed[-1] == piece
    assert checker.text(0) == "aENx" == "".join(streamed)
    assert bytes(checker.tokens(0)).decode() == "aENxEND"  # tokens are kept


def test_stop_string_from_multi_char_tokens_and_reason_priority():
    vocab = ["hel", "lo", " wor", "ld", "<eos>", "o w"]
    decode = lambda ids: "".join(vocab[i] for i in ids)  # noqa: E731
    cfg = DecodingConfig(stop_strings=["lo w", "ld<"], stop_token_ids=[4])
    checker = StopChecker(cfg, decode)
    reason, pieces = _feed(checker, 0, [0, 1, 2])  # "hel" + "lo" + " wor" contains "lo w"
    assert reason == "stop_string" and checker.text(0) == "hel" == "".join(pieces)
    # The stop token completes "ld<" too: reason stop_token, text still cut.
    reason, pieces = _feed(checker, 1, [3, 4])
    assert reason == "stop_token" and checker.text(1) == "" == "".join(pieces)
    # The earliest stop string wins when two complete at once.
    checker = StopChecker(DecodingConfig(stop_strings=["wor", "o w"]), decode)
    assert _feed(checker, 0, [0, 1, 2])[0] == "stop_string" and checker.text(0) == "hell"


def test_replacement_char_of_a_split_utf8_char_is_held_back():
    checker = StopChecker(DecodingConfig(), _decode_bytes)
    e_acute = list("é".encode())  # two bytes
    assert checker.update(0, ord("a")) is None and checker.stream_text(0) == "a"
    checker.update(0, e_acute[0])
    assert checker.text(0) == "a\ufffd" and checker.stream_text(0) == ""
    checker.update(0, e_acute[1])
    assert checker.stream_text(0) == "é"
    # A byte that never completes is released as U+FFFD once the next token follows it.
    checker.update(0, 0xFF)
    assert checker.stream_text(0) == ""
    checker.update(0, ord("b"))
    assert checker.stream_text(0) == "\ufffdb" and checker.text(0) == "aé\ufffdb"


def test_finish_releases_the_held_tail():
    checker = StopChecker(DecodingConfig(stop_strings=["xy"]), _decode_bytes)
    checker.update(0, ord("a")), checker.update(0, ord("x"))
    assert checker.stream_text(0) == "a"
    checker.finish(0, "length")
    assert checker.reason(0) == "length" and checker.stream_text(0) == "x"
    assert checker.text(0) == "ax" and checker.stream_text(0) == ""


def test_stop_strings_need_a_decoder():
    with pytest.raises(ValueError, match="decode"):
        StopChecker(DecodingConfig(stop_strings=["x"]))
    checker = StopChecker(DecodingConfig(stop_token_ids=[1]))
    with pytest.raises(ValueError, match="decode"):
        checker.text(0)
    checker.update(0, 3)
    assert checker.stream_text(0) == ""  # no decoder: tokens only, no text to stream


STOPS = ["ab€a", "bb", "€€"]


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet="abé€ \n", max_size=40))
def test_streamed_pieces_join_to_the_cut_text_and_never_show_a_stop_string(text):
    checker = StopChecker(DecodingConfig(stop_strings=STOPS), _decode_bytes)
    reason, pieces = _feed(checker, 0, list(text.encode()))
    streamed = "".join(pieces)
    assert streamed == checker.text(0)
    assert not any(s in streamed for s in STOPS)
    decoded = bytes(checker.tokens(0)).decode("utf-8", errors="replace")
    if reason == "stop_string":
        # Cut at the earliest stop string, which the last token completed.
        assert any(decoded.endswith(s) for s in STOPS) or "\ufffd" in decoded
        assert decoded.startswith(streamed) and any(decoded[len(streamed):].startswith(s)
                                                   for s in STOPS)
    else:
        assert streamed == text == decoded
