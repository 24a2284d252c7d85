"""Logits processors and penalties: each on its edges, parity with Hugging Face, and the order."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from armodal.generation.config import DecodingConfig
from armodal.generation.processors import (
    apply_temperature,
    min_p_filter,
    no_repeat_ngram_filter,
    presence_frequency_penalty,
    process_logits,
    repetition_penalty,
    top_k_filter,
    top_p_filter,
    typical_filter,
)

INF = float("inf")


def _logits(b: int = 6, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * 3


def _ids(b: int, length: int, v: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, v, (b, length), generator=torch.Generator().manual_seed(seed))


def _hf(proc, ids: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long) if ids is None else ids.clone()
    return proc(ids, logits.clone())


# --- min-p ---------------------------------------------------------------------------------

def test_min_p_zero_is_a_no_op_and_one_keeps_the_tied_top():
    logits = torch.tensor([[2.0, 2.0, 1.0, -INF], [0.0, 5.0, 4.999, 1.0]])
    assert torch.equal(min_p_filter(logits, 0.0), logits)
    assert torch.equal(min_p_filter(logits, 1.0), torch.tensor([[2.0, 2.0, -INF, -INF],
                                                                [-INF, 5.0, -INF, -INF]]))


def test_min_p_threshold_is_relative_to_the_top_probability():
    # p / p_max = exp(logit - max): 1, e^-0.5 = 0.61, e^-1 = 0.37, e^-3 = 0.05.
    logits = torch.tensor([[0.0, -0.5, -1.0, -3.0]])
    assert torch.equal(min_p_filter(logits, 0.5), torch.tensor([[0.0, -0.5, -INF, -INF]]))
    assert torch.equal(min_p_filter(logits, 0.3), torch.tensor([[0.0, -0.5, -1.0, -INF]]))
    # Far below float32 probability range, log space still keeps the top token alone.
    assert torch.equal(min_p_filter(torch.tensor([[0.0, -200.0]]), 1e-30),
                       torch.tensor([[0.0, -INF]]))


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5, 0.9])
def test_min_p_matches_hf(min_p):
    logits = _logits(seed=1)
    assert torch.equal(min_p_filter(logits, min_p), _hf(MinPLogitsWarper(min_p), None, logits))


def test_min_p_rejects_out_of_range():
    with pytest.raises(ValueError, match="min_p"):
        min_p_filter(_logits(), 1.5)


# --- typical -------------------------------------------------------------------------------

@pytest.mark.parametrize("mass", [0.05, 0.3, 0.7, 0.95, 0.999])
def test_typical_matches_hf(mass):
    logits = _logits(b=8, v=64, seed=2)
    logits[0, :10] = -INF  # already removed tokens must not disturb the entropy
    ours = typical_filter(logits, mass)
    assert torch.equal(ours, _hf(TypicalLogitsWarper(mass), None, logits))
    assert (ours > -INF).any(-1).all()  # the most typical token is always kept


def test_typical_mass_one_is_a_no_op_and_can_drop_the_top_token():
    logits = _logits(seed=3)
    assert torch.equal(typical_filter(logits, 1.0), logits)
    # One dominant token and many equal ones: the entropy sits near the small ones, so the
    # most likely token is not the most typical and a small mass removes it.
    logits = torch.tensor([[2.0] + [0.0] * 100])
    out = typical_filter(logits, 0.2)
    # 22 small tokens reach mass 0.2, and the other 78 tie with them in score: kept too.
    assert out[0, 0] == -INF and (out > -INF).sum() == 100


# --- repetition penalty --------------------------------------------------------------------

def test_repetition_penalty_divides_positive_multiplies_negative_once():
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0]])
    history = torch.tensor([[0, 1, 1, 1, 2, -1]])  # id 1 thrice: penalised once; -1 ignored
    out = repetition_penalty(logits, history, 2.0)
    assert torch.equal(out, torch.tensor([[1.0, -4.0, 0.0, 3.0]]))
    assert torch.equal(repetition_penalty(logits, history, 0.5),
                       torch.tensor([[4.0, -1.0, 0.0, 3.0]]))  # < 1 rewards repetition
    assert torch.equal(repetition_penalty(logits, history, 1.0), logits)


def test_repetition_penalty_ignores_pads_and_matches_hf():
    logits, ids = _logits(b=4, v=40, seed=4), _ids(4, 12, 40, seed=4)
    expected = _hf(RepetitionPenaltyLogitsProcessor(1.3), ids, logits)
    assert torch.allclose(repetition_penalty(logits, ids, 1.3), expected, rtol=0, atol=0)
    # Left padding a row changes nothing: pads are not id V-1 (the -1 index) nor id 0.
    padded = torch.cat([torch.full((4, 5), -1), ids], dim=1)
    assert torch.equal(repetition_penalty(logits, padded, 1.3), expected)


# --- presence / frequency ------------------------------------------------------------------

def test_presence_frequency_exact_numbers():
    logits = torch.zeros(2, 5)
    generated = torch.tensor([[1, 1, 1, 3, -1], [-1, -1, -1, -1, 4]])
    out = presence_frequency_penalty(logits, generated, presence=0.5, frequency=0.25)
    expected = torch.tensor([[0.0, -(0.5 + 0.75), 0.0, -(0.5 + 0.25), 0.0],
                             [0.0, 0.0, 0.0, 0.0, -(0.5 + 0.25)]])
    assert torch.equal(out, expected)
    assert torch.equal(presence_frequency_penalty(logits, generated, 0.0, 0.0), logits)
    # Negative values reward repetition.
    assert presence_frequency_penalty(logits, generated, -1.0, 0.0)[0, 1] == 1.0


def test_presence_frequency_in_process_logits_counts_only_generated_ids():
    cfg = DecodingConfig(strategy="greedy", presence_penalty=1.0, frequency_penalty=0.5)
    logits = torch.zeros(2, 4)
    history = torch.tensor([[-1, 2, 2, 3, 3], [1, 2, 3, 1, 1]])  # 3 prompt cols + 2 generated
    expected = torch.tensor([[0.0, 0.0, 0.0, -2.0], [0.0, -2.0, 0.0, 0.0]])
    # prompt_len defaults to L - step, and may be given as an int or per row.
    assert torch.equal(process_logits(logits, cfg, 2, history=history), expected)
    assert torch.equal(process_logits(logits, cfg, 2, history=history, prompt_len=3), expected)
    per_row = process_logits(logits, cfg, 2, history=history, prompt_len=torch.tensor([3, 4]))
    assert torch.equal(per_row, torch.tensor([[0.0, 0.0, 0.0, -2.0], [0.0, -1.5, 0.0, 0.0]]))


# --- no-repeat n-gram ----------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(n):
    v = 6  # a small vocabulary, so n-grams repeat often
    logits, ids = _logits(b=8, v=v, seed=5), _ids(8, 20, v, seed=n)
    ours = no_repeat_ngram_filter(logits, ids, n)
    assert torch.equal(ours, _hf(NoRepeatNGramLogitsProcessor(n), ids, logits))
    if n > 1:
        assert (ours == -INF).any()  # the case actually bans something


def test_no_repeat_ngram_edges_and_pads():
    logits = torch.zeros(1, 5)
    row = torch.tensor([[1, 2, 3, 1, 2]])  # suffix (1, 2) occurred before, followed by 3
    assert no_repeat_ngram_filter(logits, row, 3)[0].tolist() == [0, 0, 0, -INF, 0]
    assert torch.equal(no_repeat_ngram_filter(logits, row, 0), logits)  # off
    assert torch.equal(no_repeat_ngram_filter(logits, row[:, :1], 3), logits)  # too short
    # Left pads: same as the unpadded row; pad windows never match a padded short suffix.
    padded = torch.tensor([[-1, -1, 1, 2, 3, 1, 2], [-1, -1, -1, -1, -1, -1, 2]])
    out = no_repeat_ngram_filter(torch.zeros(2, 5), padded, 3)
    assert out[0].tolist() == [0, 0, 0, -INF, 0] and torch.equal(out[1], torch.zeros(5))


# --- process_logits: bans, allowed set, order ----------------------------------------------

def test_bans_and_allowed_set_through_process_logits():
    logits = torch.zeros(2, 6)
    cfg = DecodingConfig(banned_token_ids=[1, 4], allowed_token_ids=[0, 1, 2],
                         stop_token_ids=[5])
    kept = process_logits(logits, cfg, step=0) > -INF
    # allowed {0, 1, 2} plus stop id 5, minus the banned 1: bans win.
    assert kept.tolist() == [[True, False, True, False, False, True]] * 2
    cfg = DecodingConfig(allowed_token_ids=[0], stop_token_ids=[5], min_new_tokens=1)
    assert (process_logits(logits, cfg, 0) > -INF)[0].tolist() == [True] + [False] * 5
    assert (process_logits(logits, cfg, 1) > -INF)[0].tolist() == [True] + [False] * 4 + [True]
    with pytest.raises(ValueError, match="banned_token_ids"):
        process_logits(logits, DecodingConfig(banned_token_ids=[6]), 0)


def test_penalties_need_history_and_apply_to_greedy_without_temperature():
    cfg = DecodingConfig(strategy="greedy", temperature=2.0, repetition_penalty=2.0)
    with pytest.raises(ValueError, match="history"):
        process_logits(torch.zeros(1, 3), cfg, 0)
    out = process_logits(torch.tensor([[4.0, 1.0, -1.0]]), cfg, 0, history=torch.tensor([[0]]))
    assert torch.equal(out, torch.tensor([[2.0, 1.0, -1.0]]))  # penalised, not / temperature


def test_order_penalties_before_temperature():
    # Presence 1 before temperature 2 moves a logit by 0.5; after it, by 1.
    cfg = DecodingConfig(temperature=2.0, presence_penalty=1.0)
    out = process_logits(torch.tensor([[2.0, 0.0]]), cfg, 1, history=torch.tensor([[1, 0]]))
    assert torch.equal(out, torch.tensor([[0.5, 0.0]]))


def test_order_temperature_then_top_k_then_top_p_then_min_p_then_typical():
    # temperature before min-p: at T=1 token 1 has p/p_max = e^-1 < 0.5 and is dropped;
    # at T=2 it has e^-0.5 > 0.5 and stays.
    logits = torch.tensor([[0.0, -1.0]])
    assert (process_logits(logits, DecodingConfig(temperature=2.0, min_p=0.5), 0) > -INF).all()
    assert min_p_filter(logits, 0.5)[0, 1] == -INF
    # top-k before top-p: probs (0.4, 0.3, 0.3); top-2 renormalises to (0.57, 0.43), so
    # top_p=0.5 keeps one token; top-p first would keep two and top-k two as well.
    logits = torch.tensor([[0.4, 0.3, 0.3]]).log()
    out = process_logits(logits, DecodingConfig(top_k=2, top_p=0.5), 0)
    assert (out > -INF).sum() == 1
    assert (top_k_filter(top_p_filter(logits, 0.5), 2) > -INF).sum() == 2
    # The whole chain equals the functions composed in the documented order.
    logits = _logits(seed=6)
    cfg = DecodingConfig(temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, typical_p=0.8)
    manual = typical_filter(min_p_filter(top_p_filter(top_k_filter(
        apply_temperature(logits, 0.7), 20), 0.9), 0.05), 0.8)
    assert torch.equal(process_logits(logits, cfg, 0), manual)


def test_process_logits_matches_the_hf_processor_chain():
    logits, ids = _logits(b=8, v=30, seed=7), _ids(8, 16, 30, seed=7)
    cfg = DecodingConfig(temperature=0.8, top_k=15, top_p=0.95, min_p=0.02, typical_p=0.9,
                         repetition_penalty=1.2, no_repeat_ngram_size=2)
    hf = LogitsProcessorList([  # the order of transformers' _get_logits_processor
        RepetitionPenaltyLogitsProcessor(1.2), NoRepeatNGramLogitsProcessor(2),
        TemperatureLogitsWarper(0.8), TopKLogitsWarper(15), TopPLogitsWarper(0.95),
        MinPLogitsWarper(0.02), TypicalLogitsWarper(0.9)])
    ours = process_logits(logits, cfg, 4, history=ids)
    expected = hf(ids.clone(), logits.clone())
    assert torch.equal(ours > -INF, expected > -INF)
    finite = ours > -INF
    assert torch.allclose(ours[finite], expected[finite])
    assert not math.isnan(ours[finite].sum().item())
