"""Compiled decoding: the torch.compile'd single-token step equals the eager forward, compiles
once per (model, batch, cache length) and never per step, and generate(compile=True) gives
the eager tokens (greedy, ragged batches, seeded sampling, sliding windows)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._dynamo.utils import counters

from armodal.generation import DecodingConfig, generate
from armodal.generation.compiled import (
    CompiledStep,
    cache_len,
    compiled_step,
    decode_step,
)
from armodal.model import ModelConfig, Transformer

V = 64
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # GQA (4 query heads, 2 kv heads); a large init_std gives peaked logits, so greedy argmax
    # is not decided by float noise between the compiled and eager kernels.
    kw = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=48,
              init_std=0.3)
    return Transformer(ModelConfig(**{**kw, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> Transformer:
    return tiny_model()


def graphs() -> int:
    """Graphs dynamo has compiled in this process so far."""
    return counters["stats"]["unique_graphs"]


def no_recompile():
    """Any recompile of an already compiled frame raises inside this context."""
    return torch._dynamo.config.patch(error_on_recompile=True)


def greedy(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="greedy", **{"max_new_tokens": 10, **kw})


def stepped_logits(model: Transformer, step, n_steps: int = 10) -> tuple[list, object]:
    """Prefill a left-padded batch of PROMPTS eagerly, then decode n_steps fixed tokens with
    step(tokens (B, 1), cache, positions (B, 1)); returns the logits of each step and the cache."""
    torch.manual_seed(1)
    feed = torch.randint(0, V, (len(PROMPTS), n_steps))  # (B, n_steps) tokens to feed
    t = max(map(len, PROMPTS))
    idx = torch.tensor([[0] * (t - len(p)) + p for p in PROMPTS])
    positions = torch.tensor([[-1] * (t - len(p)) + list(range(len(p))) for p in PROMPTS])
    next_pos = torch.tensor([len(p) for p in PROMPTS])  # (B,)
    with torch.inference_mode():
        cache = model.new_cache(len(PROMPTS), t + n_steps + 3)  # free slots stay masked
        model(idx, cache, positions=positions)
        logits = [step(feed[:, s:s + 1], cache, (next_pos + s)[:, None]) for s in range(n_steps)]
    return logits, cache


def eager_step(model):
    return lambda tokens, cache, positions: model(tokens, cache, positions=positions)


def test_compiled_step_equals_eager_forward_without_recompiles():
    model = tiny_model()
    eager, eager_cache = stepped_logits(model, eager_step(model))
    step, before = compiled_step(model), graphs()

    def checked(tokens, cache, positions):  # the first call compiles, the rest must not
        if cache.pos == max(map(len, PROMPTS)):
            return step(tokens, cache, positions)
        with no_recompile():
            return step(tokens, cache, positions)
    compiled, cache = stepped_logits(model, checked)
    assert graphs() - before == 1  # one graph for all 10 steps
    for s, (a, b) in enumerate(zip(eager, compiled)):
        assert b.shape == a.shape == (len(PROMPTS), 1, V)
        assert torch.allclose(a, b, atol=1e-4, rtol=0), f"step {s}"
    assert cache.pos == eager_cache.pos
    assert torch.equal(cache.slot_pos, eager_cache.slot_pos)
    assert torch.allclose(cache.k, eager_cache.k, atol=1e-5)
    assert torch.allclose(cache.v, eager_cache.v, atol=1e-5)


def test_uncompiled_decode_step_is_the_same_function():
    """The function that is compiled, run eagerly, on a model with a swapped-in projection
    (as quantisation would do): it must call submodules, not read their weights."""

    class Halved(nn.Module):  # same call signature as nn.Linear, different weights
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    model = tiny_model(sliding_window=3)
    model.blocks[0].mlp.w_up = Halved(model.blocks[0].mlp.w_up)
    model.blocks[1].attn.wk = Halved(model.blocks[1].attn.wk)

    def step(tokens, cache, positions):
        slot = torch.tensor([cache.pos])
        out = decode_step(model, tokens, positions, slot, cache.k, cache.v, cache.slot_pos)
        cache.pos += 1
        return out
    for a, b in zip(stepped_logits(model, eager_step(model))[0], stepped_logits(model, step)[0]):
        assert torch.allclose(a, b, atol=1e-4, rtol=0)


@pytest.fixture
def step_calls(monkeypatch) -> list:
    """Counts the single-token steps that go through CompiledStep."""
    calls, call = [], CompiledStep.__call__

    def counted(self, tokens, cache, positions):
        calls.append(tokens.shape)
        return call(self, tokens, cache, positions)
    monkeypatch.setattr(CompiledStep, "__call__", counted)
    return calls


def test_generate_compiled_equals_eager_greedy(model, step_calls):
    for prompts in ([PROMPTS[0]], PROMPTS):  # batch 1, and a ragged left-padded batch of 3
        step_calls.clear()
        compiled = generate(model, prompts, greedy(compile=True))
        assert step_calls == [(len(prompts), 1)] * 9  # every step after the eager prefill
        step_calls.clear()
        eager = generate(model, prompts, greedy())
        assert not step_calls
        assert compiled.sequences == eager.sequences
        assert compiled.finish_reasons == eager.finish_reasons
        for a, b in zip(compiled.logprobs, eager.logprobs):
            assert a == pytest.approx(b, abs=1e-4)


def test_generate_compiled_seeded_sampling_equals_eager(model):
    config = DecodingConfig(max_new_tokens=10, seed=7, temperature=1.3, top_k=20)
    eager = generate(model, PROMPTS, config)
    compiled = generate(model, PROMPTS, DecodingConfig(**{**config.__dict__, "compile": True}))
    assert compiled.sequences == eager.sequences


def test_repeated_generate_reuses_the_graph_and_model_state_is_untouched():
    model, prompts = tiny_model(), [[1, 2, 3], [4], [5, 6]]
    before = graphs()
    first = generate(model, prompts, greedy(compile=True))
    assert graphs() - before <= 1  # none if another test already compiled batch 3
    # Other prompts and lengths, same batch size: the cache length bucket is the same, so the
    # same graph runs; a recompile would raise here.
    other_prompts = [[5, 6, 7, 8, 9, 10], [8], [1, 1]]
    with no_recompile():
        again = generate(model, prompts, greedy(compile=True))
        other = generate(model, other_prompts, greedy(compile=True, max_new_tokens=7))
    assert again.sequences == first.sequences
    assert other.sequences == generate(model, other_prompts, greedy(max_new_tokens=7)).sequences
    # Another model of the same architecture shares the graph (its weights are graph inputs,
    # not constants), and must still decode with its own weights.
    negated = tiny_model()
    with torch.no_grad():
        for p in negated.parameters():
            p.neg_()
    with no_recompile():
        theirs = generate(negated, prompts, greedy(compile=True))
    assert theirs.sequences == generate(negated, prompts, greedy()).sequences
    assert theirs.sequences != first.sequences
    assert compiled_step(model) is compiled_step(model)  # cached beside the model ...
    assert not any("compiled" in k for k in model.state_dict())  # ... not inside it
    assert copy.deepcopy(model).state_dict().keys() == model.state_dict().keys()


def test_sliding_window_model_compiles_within_its_context():
    model = tiny_model(sliding_window=4, max_seq_len=32)
    config = greedy(max_new_tokens=20)  # 25 positions: static cache, window mask in the graph
    compiled = generate(model, PROMPTS, DecodingConfig(**{**config.__dict__, "compile": True}))
    assert compiled.sequences == generate(model, PROMPTS, config).sequences


def test_sliding_window_past_max_seq_len_refuses_compile():
    model = tiny_model(sliding_window=4, max_seq_len=32)
    with pytest.raises(ValueError, match="compile=True.*max_seq_len=32.*compile=false"):
        generate(model, PROMPTS, greedy(max_new_tokens=40, compile=True))  # needs a ring
    assert generate(model, PROMPTS, greedy(max_new_tokens=40)).sequences  # eager still runs


def test_rolling_cache_is_refused_by_the_compiled_step():
    model = tiny_model(sliding_window=4)
    cache = model.new_cache(1, rolling=True)
    with pytest.raises(ValueError, match="static KV cache"):
        compiled_step(model)(torch.zeros(1, 1, dtype=torch.long), cache, torch.zeros(1, 1))


@pytest.mark.parametrize("total, max_seq_len, expected", [
    (1, 512, 64), (64, 512, 64), (65, 512, 128), (300, 512, 512), (30, 48, 48), (48, 48, 48),
])
def test_cache_len_buckets(total, max_seq_len, expected):
    assert cache_len(total, max_seq_len) == expected
