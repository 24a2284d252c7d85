"""Speculative decoding: exactly the target's output (greedy) or distribution (sampling)."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from scipy import stats as scipy_stats

from armodal.generation import DecodingConfig, generate, process_logits, stream
from armodal.generation.speculative import lookup_proposals
from armodal.model import KVCache, ModelConfig, Transformer

PROMPTS = [[1, 5, 7, 9, 5, 7], [1, 3], [1, 4, 4, 4, 4, 4, 8, 9, 10]]


def tiny(vocab: int = 40, layers: int = 2, width: int = 32, seed: int = 0,
         max_seq_len: int = 96) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=layers, n_head=2, d_model=width,
                                   d_ff=2 * width, max_seq_len=max_seq_len, init_std=0.2)).eval()


def perturbed(model: Transformer, scale: float, seed: int = 1) -> Transformer:
    """A draft close to the target: some proposals accepted, some rejected."""
    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * p.std())
    return draft


@pytest.fixture(scope="module")
def target() -> Transformer:
    return tiny()


def greedy(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="greedy", max_new_tokens=kw.pop("max_new_tokens", 24), **kw)


@pytest.mark.parametrize("draft_kind", ["self", "close", "unrelated", "lookup"])
def test_greedy_speculative_equals_plain_greedy_batched_and_single(target, draft_kind):
    draft = {"self": target, "close": perturbed(target, 0.3), "unrelated": tiny(seed=7),
             "lookup": None}[draft_kind]
    mode = "prompt_lookup" if draft is None else "draft"
    plain = generate(target, PROMPTS, greedy())
    spec = generate(target, PROMPTS, greedy(speculative=mode), draft=draft)
    assert spec.sequences == plain.sequences
    assert spec.finish_reasons == plain.finish_reasons
    for a, b in zip(spec.logprobs, plain.logprobs):
        assert a == pytest.approx(b, abs=1e-4)
    for prompt, expected in zip(PROMPTS, plain.sequences):  # batch of one, each prompt
        single = generate(target, [prompt], greedy(speculative=mode), draft=draft)
        assert single.sequences == [expected]


def test_partial_acceptance_is_exercised(target):
    """The close draft must give a mix of accepted and rejected proposals, or the equality
    tests above would not test the rollback."""
    out = generate(target, PROMPTS, greedy(speculative="draft"), draft=perturbed(target, 0.3))
    s = out.speculative
    assert 0 < s.accepted < s.drafted
    assert s.new_tokens == sum(len(seq) for seq in out.sequences)
    full = generate(target, PROMPTS, greedy(speculative="draft", draft_confidence=0.0),
                    draft=target).speculative
    assert full.acceptance_rate == 1.0
    assert full.tokens_per_step > 5  # gamma grows from 4 while everything is accepted
    # A draft never confident enough proposes one token per step and row.
    timid = generate(target, PROMPTS, greedy(speculative="draft", draft_confidence=1.0),
                     draft=perturbed(target, 0.3)).speculative
    assert timid.row_steps - len(PROMPTS) <= timid.drafted <= timid.row_steps


def test_greedy_speculative_with_penalties_stops_and_min_tokens(target):
    config = dict(repetition_penalty=1.3, no_repeat_ngram_size=3, presence_penalty=0.5,
                  min_new_tokens=5, stop_token_ids=(2, 11), max_new_tokens=30)
    plain = generate(target, PROMPTS, greedy(**config))
    for mode, draft in (("draft", perturbed(target, 0.3)), ("prompt_lookup", None)):
        spec = generate(target, PROMPTS, greedy(speculative=mode, **config), draft=draft)
        assert spec.sequences == plain.sequences
        assert spec.finish_reasons == plain.finish_reasons


def test_rows_stopping_early_and_allowed_mask(target):
    allowed = torch.ones(target.config.vocab_size, dtype=torch.bool)
    allowed[20:] = False
    config = greedy(stop_token_ids=(3, 4, 5), max_new_tokens=40)
    plain = generate(target, PROMPTS, config, allowed_mask=allowed)
    spec = generate(target, PROMPTS, DecodingConfig(**{**config.__dict__, "speculative": "draft"}),
                    allowed_mask=allowed, draft=perturbed(target, 0.3))
    assert spec.sequences == plain.sequences
    assert all(t < 20 for seq in spec.sequences for t in seq)


def test_holes_are_compacted_when_the_cache_fills(monkeypatch):
    """A context just long enough forces KVCache.compact; the output must not change."""
    target = tiny(max_seq_len=40)
    calls = []
    original = KVCache.compact
    monkeypatch.setattr(KVCache, "compact", lambda self: (calls.append(1), original(self)))
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 9], [1, 5, 5, 5]]
    config = greedy(max_new_tokens=32)
    plain = generate(target, prompts, config)
    spec = generate(target, prompts, greedy(max_new_tokens=32, speculative="draft"),
                    draft=perturbed(target, 0.5))
    assert calls, "the test did not exercise compaction"
    assert spec.sequences == plain.sequences


@pytest.mark.parametrize("compact", [False, True])
def test_cache_discard_and_compact_keep_attention_exact(compact):
    """Rows with holes (discarded drafts), compacted or not, give the logits of a clean run."""
    model = tiny()
    seqs = torch.tensor([[1, 5, 7, 9, 11, 13], [1, 2, 3, 4, 6, 8]])
    reference = model(seqs)[:, -1]  # (2, V)
    cache = model.new_cache(2, 32)
    model(seqs[:, :3], cache)
    model(torch.tensor([[9, 31, 32], [33, 34, 35]]), cache)  # drafts at positions 3..5
    cache.discard_from(torch.tensor([4, 3]))  # row 0 keeps its right draft (9), row 1 none
    assert cache.padded and cache.pos == 4
    assert cache.slot_pos.tolist()[0][:4] == [0, 1, 2, 3]
    assert cache.slot_pos.tolist()[1][:4] == [0, 1, 2, -1]
    if compact:
        cache.compact()
        assert cache.pos == 4 and cache.slot_pos.tolist()[1][:4] == [0, 1, 2, -1]
    # Row 0 goes on from position 4, row 1 from 3 (left-padded to one width).
    out = model(torch.tensor([[0, 11, 13], [4, 6, 8]]), cache,
                positions=torch.tensor([[-1, 4, 5], [3, 4, 5]]))[:, -1]
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)


def test_compact_removes_left_padding_and_holes():
    model = tiny()
    cache = model.new_cache(2, 16)
    model(torch.tensor([[0, 0, 1, 5], [1, 2, 3, 4]]), cache,
          positions=torch.tensor([[-1, -1, 0, 1], [0, 1, 2, 3]]))
    k_row0 = cache.k[:, 0, :, 2:4].clone()
    cache.compact()
    assert cache.pos == 4 and cache.padded
    assert cache.slot_pos[:, :4].tolist() == [[0, 1, -1, -1], [0, 1, 2, 3]]
    torch.testing.assert_close(cache.k[:, 0, :, :2], k_row0)


def _exact_two_token_distribution(model, prompt, config) -> torch.Tensor:
    """The target's exact joint probability (V, V) of the first two new tokens."""
    vocab = model.config.vocab_size
    with torch.no_grad():
        first = process_logits(model(torch.tensor([prompt]))[:, -1], config, 0).softmax(-1)[0]
        grid = torch.tensor([prompt + [t] for t in range(vocab)])
        second = process_logits(model(grid)[:, -1], config, 1).softmax(-1)  # (V, V)
    return first[:, None] * second


@pytest.mark.parametrize("filters", [{}, {"top_k": 4}, {"top_p": 0.8, "temperature": 0.7}])
@pytest.mark.parametrize("mode", ["draft", "prompt_lookup"])
def test_speculative_sampling_reproduces_the_target_distribution(filters, mode):
    """Chi-square goodness of fit of the first two sampled tokens against the target's exact
    joint distribution, over thousands of independently seeded rows."""
    vocab, n = 6, 3000
    target = tiny(vocab=vocab, seed=3)
    draft = tiny(vocab=vocab, seed=4) if mode == "draft" else None
    prompt = [1, 2, 3, 1, 2]  # prompt lookup proposes 3 after "1 2"
    config = DecodingConfig(strategy="sample", max_new_tokens=2, speculative=mode,
                            num_return_sequences=n, seed=123, **filters)
    out = generate(target, [prompt], config, draft=draft)
    assert 0 < out.speculative.accepted < out.speculative.drafted
    counts = torch.zeros(vocab, vocab)
    for a, b in out.sequences:
        counts[a, b] += 1
    expected = _exact_two_token_distribution(target, prompt, config) * n
    keep = expected.flatten() > 0
    assert counts.flatten()[~keep].sum() == 0, "sampled a token the filters remove"
    observed, expected = counts.flatten()[keep], expected.flatten()[keep]
    # Pool the rare cells so every expected count is >= 5 (the chi-square rule of thumb).
    rare = expected < 5
    observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    p_value = scipy_stats.chisquare(observed.numpy(), expected.numpy() * observed.sum().item()
                                    / expected.sum().item()).pvalue
    assert p_value > 1e-3, f"speculative samples differ from the target (p={p_value:.2e})"


def test_plain_sampling_passes_the_same_check():
    """The check itself: plain sampling passes; a wrong distribution (the draft's) fails."""
    vocab, n = 6, 3000
    target, other = tiny(vocab=vocab, seed=3), tiny(vocab=vocab, seed=4)
    prompt = [1, 2, 3, 1, 2]
    config = DecodingConfig(strategy="sample", max_new_tokens=2, num_return_sequences=n, seed=5)
    expected = _exact_two_token_distribution(target, prompt, config).flatten() * n
    for model, should_pass in ((target, True), (other, False)):
        counts = torch.zeros(vocab * vocab)
        for a, b in generate(model, [prompt], config).sequences:
            counts[a * vocab + b] += 1
        keep = expected >= 5
        obs, exp = counts[keep], expected[keep]
        p_value = scipy_stats.chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue
        assert (p_value > 1e-3) == should_pass


def test_seeded_speculative_sampling_is_reproducible_and_streams_the_same(target):
    config = DecodingConfig(strategy="sample", max_new_tokens=20, top_k=10, seed=42,
                            speculative="draft")
    draft = perturbed(target, 0.3)
    first = generate(target, PROMPTS, config, draft=draft)
    again = generate(target, PROMPTS, config, draft=draft)
    assert first.sequences == again.sequences
    events = stream(target, PROMPTS, config, draft=draft)
    streamed = [[] for _ in PROMPTS]
    for event in events:
        streamed[event.row].append(event.token)
    assert streamed == first.sequences


def test_top_logprobs_match_plain_decoding(target):
    plain = generate(target, PROMPTS[:1], greedy(top_logprobs=3, max_new_tokens=10))
    spec = generate(target, PROMPTS[:1], greedy(top_logprobs=3, max_new_tokens=10,
                                                speculative="prompt_lookup"))
    for a, b in zip(plain.top_logprobs[0], spec.top_logprobs[0]):
        assert [i for i, _ in a] == [i for i, _ in b]
        assert [v for _, v in a] == pytest.approx([v for _, v in b], abs=1e-4)


def test_lookup_proposals():
    assert lookup_proposals([1, 2, 3, 4, 1, 2], 3, 2) == [3, 4]
    assert lookup_proposals([1, 2, 3, 4, 9, 2], 3, 5) == [3, 4, 9, 2]  # falls back to n = 1
    assert lookup_proposals([7, 1, 2, 8, 1, 2], 2, 3) == [8, 1, 2]
    assert lookup_proposals([5, 5, 5, 5, 5], 2, 3) == [5, 5, 5]  # earliest: the longest run
    assert lookup_proposals([1, 2, 9, 1, 2, 8, 1, 2], 2, 1) == [9]  # earliest match wins
    assert lookup_proposals([1, 2, 3], 3, 4) == []


def test_bad_requests_are_refused(target):
    with pytest.raises(ValueError, match="needs a draft model"):
        generate(target, PROMPTS, greedy(speculative="draft"))
    with pytest.raises(ValueError, match="speculative=None"):
        generate(target, PROMPTS, greedy(), draft=target)
    with pytest.raises(ValueError, match="share the target's token ids"):
        generate(target, PROMPTS, greedy(speculative="draft"), draft=tiny(vocab=41))
    with pytest.raises(ValueError, match="step_masks"):
        generate(target, PROMPTS, greedy(speculative="prompt_lookup"),
                 step_masks=torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="speculative='draft'"):
        DecodingConfig(strategy="beam", num_beams=2, speculative="draft")
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(target, PROMPTS, greedy(speculative="prompt_lookup", max_new_tokens=95))


def test_every_token_budget_and_gamma_combination_stays_exact(target):
    draft = perturbed(target, 0.3)
    for budget, gamma, adaptive in itertools.product((1, 2, 7), (1, 3), (True, False)):
        config = greedy(max_new_tokens=budget)
        spec = generate(target, PROMPTS, greedy(max_new_tokens=budget, speculative="draft",
                                                num_draft_tokens=gamma, adaptive_draft=adaptive),
                        draft=draft)
        assert spec.sequences == generate(target, PROMPTS, config).sequences


def test_compiled_draft_steps_give_the_same_tokens(target):
    """With compile=True the single-token draft steps run the compiled decode step."""
    draft = perturbed(target, 0.3)
    plain = generate(target, PROMPTS, greedy(max_new_tokens=12))
    spec = generate(target, PROMPTS, greedy(max_new_tokens=12, speculative="draft",
                                            compile=True), draft=draft)
    assert spec.sequences == plain.sequences
    assert 0 < spec.speculative.accepted < spec.speculative.drafted
