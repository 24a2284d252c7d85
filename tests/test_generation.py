"""Decoding: filters on their edges, DecodingConfig validation, and generate() equivalences
(cached vs uncached, batched ragged vs one-by-one, seeded sampling, stops, masks)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from armodal.generation import (
    DecodingConfig,
    apply_allowed_mask,
    apply_temperature,
    generate,
    process_logits,
    suppress_tokens,
    top_k_filter,
    top_p_filter,
)
from armodal.model import ModelConfig, Transformer

V = 48
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11], [12, 13, 14], [3, 1]]


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # A larger init_std than training uses gives peaked, well-separated logits, so greedy
    # argmax is not decided by float noise between the cached and uncached paths.
    kw = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48,
              init_std=0.3)
    return Transformer(ModelConfig(**{**kw, **overrides}))


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def greedy(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="greedy", **{"max_new_tokens": 12, **kw})


def n_kept(logits: torch.Tensor) -> int:
    return int(torch.isfinite(logits).sum())


# ---------------------------------------------------------------- filters


def test_temperature_scales_and_rejects_zero():
    logits = torch.tensor([2.0, -1.0, 0.5])
    assert torch.equal(apply_temperature(logits, 1.0), logits)
    assert torch.allclose(apply_temperature(logits, 0.5), logits * 2)
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(logits, 0.0)


def test_top_k_edges():
    logits = torch.tensor([[0.1, 3.0, -2.0, 1.0, 2.0]])
    k1 = top_k_filter(logits, 1)
    assert n_kept(k1) == 1 and k1[0, 1] == 3.0
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert torch.equal(top_k_filter(logits, 99), logits)
    k2 = top_k_filter(logits, 2)
    assert torch.isfinite(k2[0]).tolist() == [False, True, False, False, True]
    assert torch.equal(logits, torch.tensor([[0.1, 3.0, -2.0, 1.0, 2.0]]))  # input untouched


def test_top_k_ties_keep_exactly_k():
    logits = torch.tensor([1.0, 5.0, 2.0, 2.0, 2.0, 0.0])
    out = top_k_filter(logits, 3)
    kept = torch.isfinite(out).nonzero().flatten().tolist()
    assert len(kept) == 3 and 1 in kept and set(kept) <= {1, 2, 3, 4}
    assert torch.equal(out[kept], logits[kept])  # kept values are unchanged


def test_top_p_edges():
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.5], [5.0, 5.0, 5.0, 5.0]])
    tiny = top_p_filter(logits, 1e-6)
    assert torch.isfinite(tiny).sum(-1).tolist() == [1, 1]
    assert torch.isfinite(tiny[0, 1])  # the top token always survives
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    # A tail that float rounding would push past cumulative 1.0 is still kept at p = 1.
    skewed = torch.tensor([0.0] + [-40.0] * 7)
    assert n_kept(top_p_filter(skewed, 1.0)) == 8


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.6, 2), (0.75, 2), (0.76, 3), (0.875, 3),
                                     (0.9, 4)])
def test_top_p_cumulative_boundary(p, kept):
    # probs 0.5, 0.25, 0.125, 0.125 (cumulative 0.5, 0.75, 0.875, 1): the set stops at the
    # first token whose cumulative mass reaches p, and includes that token.
    probs = torch.tensor([0.125, 0.5, 0.125, 0.25])
    out = top_p_filter(probs.log(), p)
    assert n_kept(out) == kept
    assert torch.isfinite(out[1])  # the 0.5 token, ranked first
    if kept >= 2:
        assert torch.isfinite(out[3])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-20, 20), min_size=1, max_size=30), st.integers(1, 40))
def test_top_k_property(values, k):
    logits = torch.tensor(values)
    out = top_k_filter(logits, k)
    kept = torch.isfinite(out)
    assert int(kept.sum()) == min(k, len(values))
    if not kept.all():
        assert logits[kept].min() >= logits[~kept].max()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=30), st.floats(0.01, 0.99))
def test_top_p_property(values, p):
    logits = torch.tensor(values, dtype=torch.float64)
    probs = logits.softmax(-1)
    kept = torch.isfinite(top_p_filter(logits, p))
    assert probs[kept].max() == probs.max()  # a most likely token is always kept
    assert probs[kept].sum() >= p - 1e-12 or kept.all()  # reaches p
    # Minimal: without its least likely member the kept set no longer reaches p.
    assert probs[kept].sum() - probs[kept].min() < p + 1e-12
    if not kept.all():
        assert probs[kept].min() >= probs[~kept].max()


def test_allowed_mask_and_suppress():
    logits = torch.zeros(2, 4)
    shared = apply_allowed_mask(logits, torch.tensor([True, False, True, False]))
    assert torch.isfinite(shared).tolist() == [[True, False, True, False]] * 2
    per_row = apply_allowed_mask(logits, torch.tensor([[True] * 4, [False, False, False, True]]))
    assert torch.isfinite(per_row).tolist() == [[True] * 4, [False, False, False, True]]
    with pytest.raises(ValueError, match="bool"):
        apply_allowed_mask(logits, torch.ones(4))
    out = suppress_tokens(logits, (1, 3))
    assert torch.isfinite(out).tolist() == [[True, False, True, False]] * 2
    assert torch.equal(suppress_tokens(logits, ()), logits)
    assert torch.isfinite(logits).all()  # input untouched


def test_process_logits_order_and_min_new_tokens():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    cfg = DecodingConfig(top_k=2, temperature=2.0, min_new_tokens=2, stop_token_ids=[0])
    # Step 0: stop id 0 blocked, then temperature, then top-k on what is left.
    out = process_logits(logits, cfg, step=0)
    assert torch.allclose(out, torch.tensor([[-math.inf, 1.5, 1.0, -math.inf]]))
    out = process_logits(logits, cfg, step=2)  # min_new_tokens reached: 0 is back
    assert torch.allclose(out, torch.tensor([[2.0, 1.5, -math.inf, -math.inf]]))
    # Greedy ignores temperature / truncation (they cannot change the argmax).
    assert torch.equal(process_logits(logits, DecodingConfig(temperature=0, top_k=1), 0), logits)


# ---------------------------------------------------------------- config


def test_config_defaults_and_conversion():
    cfg = DecodingConfig(stop_token_ids=[3, 4])
    assert cfg.stop_token_ids == (3, 4) and not cfg.is_greedy
    assert DecodingConfig(temperature=0).is_greedy
    assert DecodingConfig(strategy="greedy", temperature=0.7).is_greedy


@pytest.mark.parametrize("field, value", [
    ("strategy", "nucleus"), ("max_new_tokens", 0), ("max_new_tokens", 2.5),
    ("min_new_tokens", -1), ("min_new_tokens", 500), ("temperature", -0.1),
    ("top_k", 0), ("top_k", 1.5), ("top_p", 0.0), ("top_p", 1.5), ("seed", "x"),
    ("stop_token_ids", [-1]), ("stop_token_ids", "2"), ("use_cache", "yes"),
])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field) as err:
        DecodingConfig(**{field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


# ---------------------------------------------------------------- generate


def test_cache_logits_match_full_forward(model):
    torch.manual_seed(1)
    seq = torch.randint(0, V, (2, 20))
    with torch.inference_mode():
        full = model.eval()(seq)  # (B, T, V)
        cache = model.new_cache(2, 20)
        stepped = [model(seq[:, :8], cache)]  # prefill
        stepped += [model(seq[:, t:t + 1], cache) for t in range(8, 20)]
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-5, rtol=0)


def test_cached_equals_uncached(model):
    cached = generate(model, PROMPTS, greedy(use_cache=True))
    uncached = generate(model, PROMPTS, greedy(use_cache=False))
    assert cached.sequences == uncached.sequences
    for a, b in zip(cached.logprobs, uncached.logprobs):
        assert a == pytest.approx(b, abs=1e-4)


def test_greedy_logprobs_are_model_logprobs(model):
    out = generate(model, [PROMPTS[0]], greedy(max_new_tokens=6))
    full = torch.tensor([PROMPTS[0] + out.sequences[0]])
    with torch.inference_mode():
        logp = model(full)[0, len(PROMPTS[0]) - 1:-1].log_softmax(-1)  # (6, V)
    expected = logp.gather(-1, full[0, len(PROMPTS[0]):, None]).squeeze(-1)
    assert out.logprobs[0] == pytest.approx(expected.tolist(), abs=1e-5)
    assert out.sequences[0] == logp.argmax(-1).tolist()


def test_ragged_batch_equals_one_by_one(model):
    batched = generate(model, PROMPTS, greedy())
    singles = [generate(model, [p], greedy()).sequences[0] for p in PROMPTS]
    assert batched.sequences == singles
    assert batched.prompts == PROMPTS
    as_tensor = generate(model, torch.tensor([PROMPTS[2], PROMPTS[3]]), greedy())
    assert as_tensor.sequences == singles[2:4]


def test_seeded_sampling_reproducible(model):
    cfg = DecodingConfig(max_new_tokens=16, seed=123, temperature=1.5)
    a, b = generate(model, PROMPTS, cfg), generate(model, PROMPTS, cfg)
    assert a.sequences == b.sequences and a.logprobs == b.logprobs
    c = generate(model, PROMPTS, DecodingConfig(max_new_tokens=16, seed=124, temperature=1.5))
    assert c.sequences != a.sequences


def test_top_k1_sampling_equals_greedy(model):
    sampled = generate(model, PROMPTS, DecodingConfig(top_k=1, temperature=1.3, seed=5,
                                                      max_new_tokens=12))
    assert sampled.sequences == generate(model, PROMPTS, greedy()).sequences
    # The processed distribution is one-hot, so every chosen token has log-prob 0.
    assert all(lp == 0.0 for row in sampled.logprobs for lp in row)
    zero_t = generate(model, PROMPTS, DecodingConfig(temperature=0, max_new_tokens=12))
    assert zero_t.sequences == sampled.sequences


def test_stop_token_ends_row(model):
    free = generate(model, PROMPTS, greedy())
    stop = free.sequences[0][2]
    out = generate(model, PROMPTS, greedy(stop_token_ids=[stop]))
    for row, seq in enumerate(free.sequences):
        if stop in seq:
            end = seq.index(stop) + 1
            assert out.sequences[row] == seq[:end]  # stop token kept, nothing after it
            assert out.finish_reasons[row] == "stop_token"
        else:
            assert out.sequences[row] == seq and out.finish_reasons[row] == "length"
    assert out.finish_reasons[0] == "stop_token" and len(out.sequences[0]) <= 3
    assert free.finish_reasons == ["length"] * len(PROMPTS)
    assert all(len(s) == 12 for s in free.sequences)


def test_min_new_tokens_blocks_stop_ids(model):
    first = generate(model, PROMPTS[:1], greedy()).sequences[0][0]
    out = generate(model, PROMPTS[:1], greedy(stop_token_ids=[first], min_new_tokens=4))
    assert first not in out.sequences[0][:4]
    assert len(out.sequences[0]) >= 4
    assert out.sequences[0][0] != first


def test_allowed_mask_confines_tokens(model):
    torch.manual_seed(3)
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[torch.randperm(V)[:5]] = True
    for cfg in (greedy(), DecodingConfig(max_new_tokens=12, seed=0, temperature=2.0)):
        out = generate(model, PROMPTS, cfg, allowed_mask=allowed)
        assert all(allowed[t] for seq in out.sequences for t in seq)
    per_row = torch.zeros(len(PROMPTS), V, dtype=torch.bool)
    for r in range(len(PROMPTS)):
        per_row[r, [r, r + 10]] = True
    out = generate(model, PROMPTS, DecodingConfig(max_new_tokens=8, seed=0), allowed_mask=per_row)
    for r, seq in enumerate(out.sequences):
        assert set(seq) <= {r, r + 10}
    with pytest.raises(ValueError, match="allowed_mask"):
        generate(model, PROMPTS, greedy(), allowed_mask=torch.ones(3, V, dtype=torch.bool))


def test_on_token_streams_and_mode_restored(model):
    seen: list[tuple[int, int]] = []
    model.train()
    out = generate(model, PROMPTS, greedy(max_new_tokens=4), on_token=lambda r, t: seen.append(
        (r, t)))
    assert model.training
    for row, seq in enumerate(out.sequences):
        assert [t for r, t in seen if r == row] == seq
    model.eval()


def test_bad_requests_raise(model):
    with pytest.raises(ValueError, match="max_seq_len=48") as err:
        generate(model, [[1] * 40], greedy(max_new_tokens=9))
    assert "40" in str(err.value) and "max_new_tokens=9" in str(err.value)
    generate(model, [[1] * 40], greedy(max_new_tokens=8))  # exactly fits
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], greedy())
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], greedy())
    with pytest.raises(ValueError, match="vocabulary"):
        generate(model, [[V]], greedy())
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(model, [[1]], greedy(stop_token_ids=[V]))
    with pytest.raises(ValueError, match="multi-stream"):
        generate(tiny_model(n_streams=2), [[1]], greedy())


def test_fit_to_context_cuts_max_new_tokens_to_the_room_left():
    from armodal.generation import fit_to_context

    model = Transformer(ModelConfig(vocab_size=11, n_layer=1, n_head=2, d_model=16,
                                    max_seq_len=20))
    config = DecodingConfig(max_new_tokens=50, min_new_tokens=30)
    fitted = fit_to_context(config, model, prompt_len=5)
    assert (fitted.max_new_tokens, fitted.min_new_tokens) == (15, 15)
    assert fit_to_context(DecodingConfig(max_new_tokens=4), model, 5).max_new_tokens == 4
    with pytest.raises(ValueError, match="no room"):
        fit_to_context(config, model, prompt_len=20)
    out = generate(model, [[1] * 5], fitted)
    assert len(out.sequences[0]) == 15
