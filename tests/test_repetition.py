"""Repetition measures (distinct-n, rep-n, trailing loop) on hand-counted sequences, and the
`armodal generate ... report=true` table."""

from __future__ import annotations

import json

import pytest
import torch

from armodal.generation.repetition import (
    distinct_n,
    format_report,
    repeated_suffix_loop,
    repetition_rate,
    repetition_report,
)

LOOP = [1, 2, 3] * 4  # 12 tokens, a 3-token loop from the start


def test_a_three_token_loop():
    # n-grams: 12 unigrams, 11 bigrams, 10 trigrams, 9 4-grams; 3 distinct of each size.
    assert [distinct_n(LOOP, n) for n in (1, 2, 3, 4)] == pytest.approx([3 / 12, 3 / 11,
                                                                        3 / 10, 3 / 9])
    # The 4-grams ending at tokens 3, 4, 5 are new; the six after them were all seen.
    assert repetition_rate(LOOP, 4) == pytest.approx(6 / 9)
    assert repetition_rate(LOOP, 1) == pytest.approx(9 / 12)
    assert repeated_suffix_loop(LOOP) == (3, 12)  # period 6 covers 12 too: the shortest wins
    # After a prefix, with the last copy cut short: 3 full copies + 1 token.
    assert repeated_suffix_loop([9, 8, *[1, 2, 3] * 3, 1]) == (3, 10)
    assert repeated_suffix_loop([5, 1, 2, 3, 1, 2, 3, 1]) == (3, 7)
    assert repeated_suffix_loop([4, 7, 7, 7, 7]) == (1, 4)


def test_an_all_distinct_sequence():
    seq = list(range(10))
    assert [distinct_n(seq, n) for n in (1, 2, 3, 4)] == [1.0] * 4
    assert repetition_rate(seq, 4) == 0.0
    assert repeated_suffix_loop(seq) == (0, 0)
    # A partial repeat at the end is not a loop: the block must occur twice in full.
    assert repeated_suffix_loop([1, 2, 3, 4, 1, 2]) == (0, 0)


def test_short_and_empty_sequences_have_nothing_to_count():
    assert distinct_n([5, 6], 2) == 1.0 and distinct_n([5, 6], 3) is None
    assert repetition_rate([5, 6, 5], 4) is None and repetition_rate([5, 5], 1) == 0.5
    assert repeated_suffix_loop([5]) == (0, 0) and repeated_suffix_loop([5, 5]) == (1, 2)
    assert distinct_n([], 1) is None and repetition_rate([], 1) is None
    assert repeated_suffix_loop([]) == (0, 0)
    assert distinct_n(torch.tensor([3, 3, 4]), 1) == pytest.approx(2 / 3)  # tensors count too
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=f"n={bad!r}; expected an int >= 1"):
            distinct_n([1, 2], bad)


def test_report_per_sequence_and_pooled():
    report = repetition_report([LOOP, [1, 2, 3, 4], [1, 2, 3, 4], []])
    first = report["sequences"][0]
    assert first == {"tokens": 12, "distinct_1": 0.25, "distinct_2": pytest.approx(3 / 11),
                     "distinct_3": 0.3, "distinct_4": pytest.approx(1 / 3),
                     "rep_4": pytest.approx(2 / 3), "loop_period": 3, "loop_span": 12}
    assert report["sequences"][1]["distinct_4"] == 1.0
    assert report["sequences"][3]["distinct_1"] is None
    pooled = report["all"]
    assert pooled["tokens"] == 20
    # Pooled: n-grams never span two sequences; the two equal samples repeat each other.
    assert pooled["distinct_2"] == pytest.approx(len({(1, 2), (2, 3), (3, 1), (3, 4)})
                                                 / (11 + 3 + 3))
    assert pooled["distinct_4"] == pytest.approx((3 + 1) / (9 + 1 + 1))
    assert pooled["rep_4"] == pytest.approx((2 / 3 + 0 + 0) / 3)  # the empty one has none
    assert (pooled["loop_period"], pooled["loop_span"]) == (3, 12)
    json.dumps(report)  # plain values only
    empty = repetition_report([])
    assert empty["all"] == {"tokens": 0, "distinct_1": None, "distinct_2": None,
                            "distinct_3": None, "distinct_4": None, "rep_4": None,
                            "loop_period": 0, "loop_span": 0}


def test_format_report_is_a_table():
    lines = format_report(repetition_report([LOOP, []])).splitlines()
    assert lines[0].split() == ["seq", "tokens", "distinct-1", "distinct-2", "distinct-3",
                                "distinct-4", "rep-4", "loop-period", "loop-span"]
    assert lines[1].split() == ["0", "12", "0.250", "0.273", "0.300", "0.333", "0.667", "3",
                                "12"]
    assert lines[2].split() == ["1", "0", "-", "-", "-", "-", "-", "0", "0"]
    assert lines[3].split()[0] == "all" and len(lines) == 4
    assert len({len(line) for line in lines[:3]}) == 1  # right-aligned columns


@pytest.fixture(scope="module")
def random_run(tmp_path_factory):
    """A run directory with an untrained char model: enough for the CLI plumbing."""
    from armodal.checkpoint import save_run
    from armodal.model import ModelConfig, Transformer
    from armodal.tokenizers.space import TokenSpace
    from armodal.tokenizers.text import CharTokenizer

    tokenizer = CharTokenizer("ab ")
    space = TokenSpace({"text": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=space.vocab_size, n_layer=1, n_head=2,
                                    d_model=16, max_seq_len=64))
    return save_run(tmp_path_factory.mktemp("run") / "run", model, space, tokenizer)


def test_cli_report_goes_to_stderr_and_leaves_stdout_alone(random_run, capsys):
    from armodal.cli import main

    base = ["generate", f"run={random_run}", "prompt=ab", "decoding=sample", "decoding.seed=1",
            "decoding.max_new_tokens=40"]
    for fmt in ("text", "jsonl"):
        main([*base, f"format={fmt}"])
        plain_out, plain_err = capsys.readouterr()
        main([*base, f"format={fmt}", "report=true"])
        out, err = capsys.readouterr()
        assert out == plain_out and "distinct-1" not in plain_err
        header, row, pooled = err.strip().splitlines()
        assert header.split()[:3] == ["seq", "tokens", "distinct-1"] and pooled.startswith("all")
        if fmt == "jsonl":
            tokens = json.loads(out)["tokens"]
            assert row.split()[1] == str(len(tokens))
            assert row.split()[2] == f"{distinct_n(tokens, 1):.3f}"
    with pytest.raises(SystemExit):
        main([*base, "report=maybe"])
    assert "report='maybe'; expected true or false" in capsys.readouterr().err
