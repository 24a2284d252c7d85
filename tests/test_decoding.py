"""The decoding engine end to end: seeds, batches, streams, guidance, layouts, long decoding."""

import pytest
import torch
from scipy.stats import chisquare

from armodal.generation import DecodingConfig, generate, stream
from armodal.generation.processors import top_k_filter
from armodal.generation.sampling import RowSampler, guided_logits
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers import ByteTokenizer, TokenSpace


def model_for(vocab: int = 40, **overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=vocab, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
               max_seq_len=64, init_std=0.3)
    cfg.update(overrides)
    return Transformer(ModelConfig(**cfg)).eval()


def test_sampling_frequencies_match_the_filtered_softmax():
    """Chi-square: draws follow softmax(top_k(logits) / T), and filtered ids never appear."""
    torch.manual_seed(1)
    logits = torch.randn(12) * 2
    temperature, k, draws = 0.7, 6, 20_000
    expected = (top_k_filter(logits, k) / temperature).softmax(-1)
    sampler = RowSampler([123], [0])
    counts = torch.zeros(12)
    for _ in range(draws // 500):
        tokens = torch.cat([sampler.sample(expected[None]) for _ in range(500)])
        counts += torch.bincount(tokens, minlength=12).float()
    assert counts[expected == 0].sum() == 0
    kept = expected > 0
    result = chisquare(counts[kept].numpy(), (expected[kept] * draws).numpy())
    assert result.pvalue > 1e-3, (counts, expected * draws)


def test_a_request_samples_the_same_whatever_else_is_in_the_batch():
    model = model_for()
    config = DecodingConfig(max_new_tokens=12, temperature=1.3)
    alone = generate(model, [[1, 5, 9]], config, seeds=[7]).sequences[0]
    batch = generate(model, [[2, 3], [1, 5, 9], [4, 4, 4, 4, 4]], config, seeds=[1, 7, 3])
    assert batch.sequences[1] == alone
    other_seed = generate(model, [[1, 5, 9]], config, seeds=[8]).sequences[0]
    assert other_seed != alone


def test_num_return_sequences_gives_distinct_reproducible_samples():
    model = model_for()
    config = DecodingConfig(max_new_tokens=10, num_return_sequences=3, seed=5, temperature=1.5)
    out = generate(model, [[1, 2], [3]], config)
    assert len(out.sequences) == 6 and out.prompts[:3] == [[1, 2]] * 3
    assert len({tuple(s) for s in out.sequences[:3]}) == 3
    assert generate(model, [[1, 2], [3]], config).sequences == out.sequences


def test_stream_yields_every_token_and_returns_the_output():
    model = model_for()
    config = DecodingConfig(strategy="greedy", max_new_tokens=8)
    events = stream(model, [[1, 2, 3], [4]], config)
    seen = []
    while True:
        try:
            seen.append(next(events))
        except StopIteration as done:
            out = done.value
            break
    for row in range(2):
        assert [e.token for e in seen if e.row == row] == out.sequences[row]
        finals = [e.finish_reason for e in seen if e.row == row and e.finish_reason]
        assert finals == ["length"]


def test_stop_strings_cut_text_and_stream_never_shows_them():
    tok = ByteTokenizer()
    model = model_for(vocab=256, max_seq_len=128)
    free = generate(model, [[65]], DecodingConfig(strategy="greedy", max_new_tokens=40))
    text = tok.decode(torch.tensor(free.sequences[0]))
    stop = text[10:13]  # a stop string greedy decoding is bound to produce
    decode = lambda ids: tok.decode(torch.tensor(ids))
    config = DecodingConfig(strategy="greedy", max_new_tokens=40, stop_strings=(stop,))
    pieces, events = [], stream(model, [[65]], config, decode=decode)
    while True:
        try:
            pieces.append(next(events).text)
        except StopIteration as done:
            out = done.value
            break
    assert out.finish_reasons == ["stop_string"]
    assert out.texts[0] == text[:text.find(stop)]
    assert "".join(pieces) == out.texts[0] and stop not in "".join(pieces)


def test_top_logprobs_are_sorted_and_contain_the_greedy_choice():
    model = model_for()
    out = generate(model, [[1, 2]], DecodingConfig(strategy="greedy", max_new_tokens=5,
                                                   top_logprobs=3))
    for token, logprob, alts in zip(out.sequences[0], out.logprobs[0], out.top_logprobs[0]):
        assert len(alts) == 3 and alts[0] == (token, pytest.approx(logprob))
        assert [a[1] for a in alts] == sorted((a[1] for a in alts), reverse=True)


def test_classifier_free_guidance():
    model = model_for()
    cond, uncond = [[1, 7, 7, 3]], [[1]]
    plain = generate(model, cond, DecodingConfig(strategy="greedy", max_new_tokens=6))
    # Identical branches: guidance changes nothing at any scale.
    same = generate(model, cond, DecodingConfig(strategy="greedy", max_new_tokens=6,
                                                cfg_scale=3.0), uncond_prompts=cond)
    assert same.sequences == plain.sequences
    # The first guided step is the argmax of log p_u + s (log p_c - log p_u).
    guided = generate(model, cond, DecodingConfig(strategy="greedy", max_new_tokens=1,
                                                  cfg_scale=3.0), uncond_prompts=uncond)
    c, u = model(torch.tensor(cond))[0, -1], model(torch.tensor(uncond))[0, -1]
    expected = guided_logits(torch.stack([c, u]), 1, 3.0)[0].argmax().item()
    assert guided.sequences[0] == [expected]
    with pytest.raises(ValueError, match="uncond_prompts"):
        generate(model, cond, DecodingConfig(cfg_scale=2.0))


def test_layout_masks_force_exactly_the_segment_layout():
    space = TokenSpace({"text": 5, "image": 9}, markers={"image": ("<boi>", "<eoi>")})
    model = model_for(vocab=space.vocab_size)
    h, w = 3, 4
    layout = (["image"] * w) * h + ["<eoi>"]
    prompt = [space.bos_id, space.special_ids["<boi>"]]
    out = generate(model, [prompt, prompt], DecodingConfig(max_new_tokens=len(layout), seed=0),
                   step_masks=space.layout_masks(layout))
    for seq in out.sequences:
        segments = space.split(prompt + seq)
        assert [m for m, _ in segments] == ["image"] and len(segments[0][1]) == h * w
        assert seq[-1] == space.special_ids["<eoi>"]


def test_sliding_window_model_decodes_past_its_context():
    short = model_for(sliding_window=8, max_seq_len=24)
    long = model_for(sliding_window=8, max_seq_len=128)
    long.load_state_dict(short.state_dict())
    config = DecodingConfig(strategy="greedy", max_new_tokens=80)
    out = generate(short, [[1, 2, 3]], config)  # 83 positions > max_seq_len 24: rolling cache
    assert out.sequences == generate(long, [[1, 2, 3]], config).sequences
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate(model_for(), [[1, 2, 3]], config)  # full attention: a clear refusal


def test_penalties_are_applied_in_generation():
    model = model_for(vocab=12)
    base = DecodingConfig(strategy="greedy", max_new_tokens=30)
    plain = generate(model, [[1]], base).sequences[0]
    banned = generate(model, [[1]], DecodingConfig(strategy="greedy", max_new_tokens=30,
                                                   no_repeat_ngram_size=2)).sequences[0]
    row = [1] + banned
    bigrams = list(zip(row, row[1:]))
    assert len(bigrams) == len(set(bigrams)) and banned != plain
    no_fives = generate(model, [[1]], DecodingConfig(max_new_tokens=30, seed=0,
                                                     banned_token_ids=(5,)))
    assert 5 not in no_fives.sequences[0]


@pytest.mark.parametrize("field,value", [
    ("top_p", 0.0), ("top_p", 1.5), ("temperature", -0.1), ("top_k", -1), ("num_beams", 0),
    ("max_new_tokens", -1), ("min_p", 2.0), ("repetition_penalty", 0.0),
    ("speculative", "medusa"), ("num_draft_tokens", 0), ("draft_confidence", 1.5),
    ("prompt_lookup_max_ngram", 0), ("compile", "yes"), ("adaptive_draft", None),
])
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DecodingConfig(**{field: value})


def test_beam_with_sampling_options_is_refused():
    with pytest.raises(ValueError, match="top_p"):
        DecodingConfig(strategy="beam", num_beams=4, top_p=0.9)
    with pytest.raises(ValueError, match="compile=True"):
        DecodingConfig(strategy="beam", num_beams=4, compile=True)
    with pytest.raises(ValueError, match="compile=True"):
        DecodingConfig(compile=True, use_cache=False)


def test_ids_outside_the_vocabulary_are_refused_before_compute():
    model = model_for(vocab=40)
    with pytest.raises(ValueError, match="stop_token_ids"):
        generate(model, [[1]], DecodingConfig(stop_token_ids=(40,)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 99]], DecodingConfig())
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], DecodingConfig())


def test_generate_routes_beam_strategy_to_beam_search():
    model = model_for()
    out = generate(model, [[1, 2], [3]], DecodingConfig(strategy="beam", num_beams=3,
                                                        max_new_tokens=5,
                                                        num_return_sequences=2))
    assert len(out.sequences) == 4 and len(out.scores) == 4
    assert out.scores[0] >= out.scores[1] and out.scores[2] >= out.scores[3]
