"""Beam search: num_beams=1 is greedy, a wide beam is an exhaustive search, and the sequences
and scores equal Hugging Face transformers' beam search on the same weights."""

from __future__ import annotations

import itertools

import pytest
import torch

from armodal.generation import DecodingConfig, GenerationOutput, generate
from armodal.generation.beam import BeamOutput, beam_search
from armodal.model import ModelConfig, Transformer


def beam(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="beam", **kw)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # A large init_std gives peaked, well-separated distributions: rankings are not decided
    # by float noise, and a few tokens are clearly preferred (so an eos gets chosen).
    kw = dict(vocab_size=6, n_layer=2, n_head=2, d_model=16, max_seq_len=16, init_std=0.5)
    return Transformer(ModelConfig(**{**kw, **overrides}))


# ---------------------------------------------------------------- greedy and exhaustive


# 26 is the 2nd greedy token after prompt 0, so the stop id is really exercised; the
# penalties check that each beam's own history (prompt + new tokens) reaches the processors.
@pytest.mark.parametrize("kw", [{}, {"stop_token_ids": (26,)},
                                {"repetition_penalty": 1.5, "no_repeat_ngram_size": 2,
                                 "frequency_penalty": 0.5}])
def test_one_beam_is_greedy(kw):
    model = tiny_model(vocab_size=32, max_seq_len=32, init_std=0.3)
    prompts = [[1, 2, 3], [5], [7, 8]]
    want = generate(model, prompts, DecodingConfig(strategy="greedy", max_new_tokens=10, **kw))
    got = beam_search(model, prompts, beam(num_beams=1, max_new_tokens=10, **kw))
    assert got.sequences == want.sequences
    assert got.finish_reasons == want.finish_reasons
    if "stop_token_ids" in kw:
        assert "stop_token" in got.finish_reasons
    if "repetition_penalty" in kw:
        plain = beam_search(model, prompts, beam(num_beams=1, max_new_tokens=10))
        assert got.sequences != plain.sequences
    for g, w, total in zip(got.logprobs, want.logprobs, got.sum_logprobs):
        assert g == pytest.approx(w, abs=1e-5)
        assert sum(g) == pytest.approx(total, abs=1e-4)


def all_continuations(model: Transformer, prompt: list[int], steps: int):
    """Every length-`steps` continuation (all V**steps) and the cumulative log-probs of its
    prefixes, from one uncached forward pass (so the cached beam path is checked too)."""
    v = model.config.vocab_size
    conts = torch.tensor(list(itertools.product(range(v), repeat=steps)))  # (V**S, S)
    idx = torch.cat([torch.tensor(prompt).expand(len(conts), -1), conts], dim=1)
    with torch.no_grad():
        logp = model(idx)[:, len(prompt) - 1:-1].log_softmax(-1)  # (V**S, S, V)
    token_logp = logp.gather(-1, conts[..., None]).squeeze(-1)  # (V**S, S)
    return conts.tolist(), token_logp.cumsum(-1).tolist()


def test_wide_beam_is_exhaustive_without_stop():
    model, prompt, steps = tiny_model(), [1, 4], 3
    n = 6 ** (steps - 1)  # every prefix up to steps - 1 fits in the beam
    conts, prefix_sums = all_continuations(model, prompt, steps)
    ranked = sorted(zip(conts, (s[-1] for s in prefix_sums)), key=lambda c: -c[1])
    for lp in (1.0, 0.0):  # all hypotheses have the same length: the penalty cannot matter
        out = beam_search(model, [prompt], beam(num_beams=n, max_new_tokens=steps,
                                                 length_penalty=lp, num_return_sequences=5))
        assert out.sequences == [c for c, _ in ranked[:5]]
        assert out.sum_logprobs == pytest.approx([s for _, s in ranked[:5]], abs=1e-4)
        assert out.scores == pytest.approx([s / steps ** lp for _, s in ranked[:5]], abs=1e-4)
        assert out.finish_reasons == ["length"] * 5


@pytest.mark.parametrize("early_stopping", [True, False, "never"])
def test_wide_beam_is_exhaustive_with_stop(early_stopping):
    # init_std=0.2 and eos=3: the winner is [3] for length_penalty 0 and 1 but a 3-token
    # hypothesis for 2, each by a margin >= 0.03 (far above float noise).
    model, prompt, steps, eos = tiny_model(init_std=0.2), [1, 4], 3, 3
    n = 6 ** (steps - 1)
    conts, prefix_sums = all_continuations(model, prompt, steps)
    # Hypotheses: stopped at eos after 1..steps tokens (eos only at the end), or cut at steps.
    # Length, as in HF 5.x: new tokens, eos included.
    hyps = {}
    for cont, sums in zip(conts, prefix_sums):
        end = cont.index(eos) + 1 if eos in cont else steps
        hyps[tuple(cont[:end])] = sums[end - 1]
    best_ends = set()
    for lp in (0.0, 1.0, 2.0):
        best, total = max(hyps.items(), key=lambda h: h[1] / len(h[0]) ** lp)
        out = beam_search(model, [prompt], beam(num_beams=n, max_new_tokens=steps,
                                                 stop_token_ids=(eos,), length_penalty=lp,
                                                 early_stopping=early_stopping))
        assert out.sequences == [list(best)], f"length_penalty={lp}"
        assert out.scores[0] == pytest.approx(total / len(best) ** lp, abs=1e-4)
        assert out.finish_reasons == ["stop_token" if best[-1] == eos else "length"]
        best_ends.add(len(best))
    assert len(best_ends) > 1  # the penalty really changes which hypothesis wins


def test_allowed_mask_and_min_new_tokens_are_respected():
    model = tiny_model(vocab_size=12)
    allowed = torch.zeros(12, dtype=torch.bool)
    allowed[[2, 5, 7, 9]] = True
    out = beam_search(model, [[1], [3, 4]], beam(num_beams=3, max_new_tokens=5, min_new_tokens=3,
                                                  stop_token_ids=(7,), num_return_sequences=3),
                      allowed_mask=allowed)
    for seq, reason in zip(out.sequences, out.finish_reasons):
        assert set(seq) <= {2, 5, 7, 9}
        assert 7 not in seq[:3]
        assert (reason == "stop_token") == (seq[-1] == 7) and len(seq) <= 5
    assert out.scores == sorted(out.scores[:3], reverse=True) + sorted(out.scores[3:], reverse=True)


def test_stop_sequence_finishes_a_hypothesis():
    model = tiny_model()
    plain = beam_search(model, [[1, 4]], beam(num_beams=2, max_new_tokens=6))
    stop_seq = plain.sequences[0][1:3]  # the best beam's 2nd and 3rd tokens
    out = beam_search(model, [[1, 4]], beam(num_beams=2, max_new_tokens=6,
                                            stop_sequences=(stop_seq,), num_return_sequences=2))
    assert out.finish_reasons[0] == "stop_sequence" and out.sequences[0] == plain.sequences[0][:3]
    for seq, reason in zip(out.sequences, out.finish_reasons):
        ends = [i + 2 for i in range(len(seq) - 1) if seq[i:i + 2] == stop_seq]
        # The stop sequence occurs only at the very end of a stopped hypothesis.
        assert ends == ([len(seq)] if reason == "stop_sequence" else [])


def test_errors_and_conversion():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"10 tokens.*max_new_tokens=7.*max_seq_len=16"):
        beam_search(model, [[1] * 10], beam(num_beams=2, max_new_tokens=7))
    with pytest.raises(ValueError, match="prompt 1"):
        beam_search(model, [[1], []], beam(num_beams=2, max_new_tokens=2))
    out = beam_search(model, [[1], [2, 3]], beam(num_beams=3, max_new_tokens=4,
                                                 num_return_sequences=2))
    assert isinstance(out, BeamOutput) and out.prompts == [[1], [1], [2, 3], [2, 3]]
    gen = out.to_generation_output()
    assert isinstance(gen, GenerationOutput)
    assert gen.sequences == out.sequences and gen.finish_reasons == out.finish_reasons


# ---------------------------------------------------------------- Hugging Face parity


@pytest.fixture(scope="module")
def hf_pair():
    return build_hf_pair(pytest.importorskip("transformers"))


def build_hf_pair(transformers):
    """A random tiny Llama and an armodal Transformer holding the same weights."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = transformers.LlamaForCausalLM(cfg).eval()
    ours = Transformer(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32,
                                   d_ff=64, max_seq_len=64, norm_eps=1e-5)).eval()
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
    for i in range(2):
        a, b = f"blocks.{i}.", f"model.layers.{i}."
        names |= {a + "attn_norm.weight": b + "input_layernorm.weight",
                  a + "mlp_norm.weight": b + "post_attention_layernorm.weight"}
        names |= {a + f"attn.w{x}.weight": b + f"self_attn.{x}_proj.weight" for x in "qkvo"}
        names |= {a + f"mlp.w_{x}.weight": b + f"mlp.{x}_proj.weight"
                  for x in ("gate", "up", "down")}
    hf_state = hf.state_dict()
    ours.load_state_dict({k: hf_state[v] for k, v in names.items()})
    return hf, ours


PARITY_PROMPTS = [[3, 17, 8, 41, 2], [9, 9, 30, 1, 44]]


def test_hf_logits_match(hf_pair):
    hf, ours = hf_pair
    idx = torch.tensor(PARITY_PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def hf_eos(hf_pair):
    """An eos id the model likes: the 1st greedy token after the second prompt. (Seeded, it
    ends some but not all returned hypotheses in every parity case.)"""
    hf, _ = hf_pair
    greedy = hf.generate(torch.tensor(PARITY_PROMPTS), do_sample=False, max_new_tokens=1,
                         pad_token_id=49, eos_token_id=None)
    return int(greedy[1, -1])


BEAM_CASES = list(itertools.product([True, False, "never"], [1.0, 0.0, 2.0]))
BEAM_CASES.append(("never", -1.0))  # a negative penalty favours short hypotheses


def assert_hf_parity(hf, ours, eos_ids: tuple[int, ...], early_stopping, length_penalty,
                     n_beams: int = 4, n_return: int = 3, max_new: int = 12) -> BeamOutput:
    """HF generate and armodal beam_search agree on every returned sequence and score."""
    with torch.no_grad():
        ref = hf.generate(torch.tensor(PARITY_PROMPTS), attention_mask=torch.ones(2, 5).long(),
                          num_beams=n_beams, do_sample=False, max_new_tokens=max_new,
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          eos_token_id=list(eos_ids), pad_token_id=49,
                          num_return_sequences=n_return, return_dict_in_generate=True,
                          output_scores=True)
    out = beam_search(ours, PARITY_PROMPTS, beam(
        num_beams=n_beams, max_new_tokens=max_new, length_penalty=length_penalty,
        early_stopping=early_stopping, stop_token_ids=eos_ids, num_return_sequences=n_return,
        beam_length="hf"))
    for row, (seq, reason) in enumerate(zip(out.sequences, out.finish_reasons)):
        want = ref.sequences[row, 5:].tolist()
        ends = [i + 1 for i, t in enumerate(want) if t in eos_ids]
        want = want[:ends[0]] if ends else want  # HF pads rows after their eos
        assert seq == want, f"row {row}"
        assert reason == ("stop_token" if ends else "length")
    torch.testing.assert_close(torch.tensor(out.scores), ref.sequences_scores,
                               atol=1e-4, rtol=0)
    return out


@pytest.mark.parametrize("early_stopping, length_penalty", BEAM_CASES)
def test_hf_beam_search_parity(hf_pair, hf_eos, early_stopping, length_penalty):
    out = assert_hf_parity(*hf_pair, (hf_eos,), early_stopping, length_penalty)
    assert "stop_token" in out.finish_reasons  # the eos really ends some hypotheses


def test_hf_parity_never_searches_longer(hf_pair, hf_eos):
    """A case where "never" (best score hoped for at max length) keeps searching after
    False (hoped for at the current length) has stopped, and finds longer hypotheses."""
    kw = dict(n_beams=2, n_return=2, max_new=20)
    stop_early = assert_hf_parity(*hf_pair, (hf_eos,), False, 2.0, **kw)
    never = assert_hf_parity(*hf_pair, (hf_eos,), "never", 2.0, **kw)
    assert never.sequences != stop_early.sequences


def test_hf_parity_many_eos(hf_pair):
    """With e eos ids HF keeps (1 + e) * num_beams candidates per step, so that num_beams
    open beams survive even when most of the best candidates stop. Eight of the most liked
    first tokens as eos ids: here keeping only 2 * num_beams would change the result."""
    hf, ours = hf_pair
    with torch.no_grad():
        first = ours(torch.tensor(PARITY_PROMPTS))[:, -1].mean(0)  # (V,)
    eos_ids = tuple(first.argsort(descending=True)[:8].tolist())
    assert_hf_parity(hf, ours, eos_ids, False, 1.0, n_beams=2, n_return=2)


def test_hf_parity_cases_differ(hf_pair, hf_eos):
    """The parity cases are not all the same search: stopping rule and penalty matter."""
    _, ours = hf_pair
    outcomes = set()
    for early_stopping, length_penalty in BEAM_CASES:
        out = beam_search(ours, PARITY_PROMPTS, beam(
            num_beams=4, max_new_tokens=12, length_penalty=length_penalty,
            early_stopping=early_stopping, stop_token_ids=(hf_eos,), num_return_sequences=3))
        outcomes.add(tuple(map(tuple, out.sequences)))
    assert len(outcomes) >= 4


def test_beam_lengths_agree_with_hf_5(hf_pair, hf_eos):
    """In transformers 5.x HF's length is new tokens incl. eos: the two conventions coincide."""
    _, ours = hf_pair
    kw = dict(num_beams=4, max_new_tokens=12, stop_token_ids=(hf_eos,), length_penalty=2.0,
              num_return_sequences=4)
    hf_out = beam_search(ours, PARITY_PROMPTS, beam(beam_length="hf", **kw))
    gen_out = beam_search(ours, PARITY_PROMPTS, beam(beam_length="generated", **kw))
    assert hf_out == gen_out
    for seq, score, total in zip(gen_out.sequences, gen_out.scores, gen_out.sum_logprobs):
        assert score == pytest.approx(total / len(seq) ** 2.0, rel=1e-5)


@pytest.mark.parametrize("kw", [{}, {"stop_token_ids": (3,), "early_stopping": True},
                                {"stop_token_ids": (2, 4), "repetition_penalty": 1.4,
                                 "length_penalty": 0.5, "early_stopping": "never"}])
def test_batched_prompts_equal_each_prompt_alone(kw):
    """Ragged prompts searched together (left-padded, searches ending at different steps)
    give every prompt exactly its own search's hypotheses, scores and log-probs."""
    model = tiny_model(vocab_size=12, max_seq_len=24).eval()
    prompts = [[1, 5, 7, 9, 2], [4], [3, 3, 8], [6, 1, 0, 2, 11, 10]]
    allowed = torch.ones(4, 12, dtype=torch.bool)
    allowed[1, 7:] = False  # a per-prompt mask, to check it follows its prompt's rows
    config = beam(num_beams=3, num_return_sequences=2, max_new_tokens=7, **kw)
    together = beam_search(model, prompts, config, allowed_mask=allowed)
    for p, prompt in enumerate(prompts):
        alone = beam_search(model, [prompt], config, allowed_mask=allowed[p:p + 1])
        rows = slice(2 * p, 2 * p + 2)
        assert together.sequences[rows] == alone.sequences
        assert together.finish_reasons[rows] == alone.finish_reasons
        assert together.scores[rows] == pytest.approx(alone.scores, abs=1e-5)
        for a, b in zip(together.logprobs[rows], alone.logprobs):
            assert a == pytest.approx(b, abs=1e-5)
