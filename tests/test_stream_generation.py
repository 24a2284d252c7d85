"""generate_codes: multi-stream decoding under the flatten / delay / parallel patterns."""

import pytest
import torch
from torch import nn

from armodal.generation import DecodingConfig
from armodal.generation.streams import generate_codes
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.patterns import PATTERN_KINDS, stream_pattern

K, CB, N_FRAMES = 3, 5, 6
PAD, BOS, BOA, OFFSET = 0, 1, 3, 4  # a TokenSpace-like layout: specials, then the codes
VOCAB = 40
GREEDY = DecodingConfig(strategy="greedy")
SAMPLE = DecodingConfig(strategy="sample", top_k=4, seed=0)


class Recorder(nn.Module):
    """A Transformer that records every forward's input ids."""

    def __init__(self, inner: Transformer):
        super().__init__()
        self.inner, self.config, self.inputs = inner, inner.config, []

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, idx, cache=None, positions=None):
        self.inputs.append(idx.clone())
        return self.inner(idx, cache, positions)


def tiny(n_streams: int, seed: int = 0) -> Recorder:
    torch.manual_seed(seed)
    return Recorder(Transformer(ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=2, d_model=32,
                                            n_streams=n_streams, max_seq_len=64)))


@pytest.fixture(scope="module", params=PATTERN_KINDS)
def setup(request):
    pattern = stream_pattern(request.param, K, CB)
    return pattern, tiny(pattern.n_streams)


def prefix_for(pattern, batch: int = 2) -> torch.Tensor:
    return torch.tensor([BOS, BOA]).repeat(batch, pattern.n_streams, 1)  # (B, S, 2)


def run(model, pattern, config=GREEDY, batch=2, **kwargs):
    model.inputs.clear()
    kwargs.setdefault("n_frames", N_FRAMES)
    return generate_codes(model, prefix_for(pattern, batch), pattern, config=config,
                          code_offset=OFFSET, fill_id=PAD, **kwargs)


@pytest.mark.parametrize("config", [GREEDY, SAMPLE], ids=["greedy", "sample"])
def test_codes_have_shape_and_range(setup, config):
    pattern, model = setup
    codes = run(model, pattern, config, batch=3)
    assert codes.shape == (3, K, N_FRAMES) and codes.dtype == torch.long
    assert ((codes >= 0) & (codes < CB)).all()


def test_cached_equals_uncached(setup):
    pattern, model = setup
    cached = run(model, pattern, use_cache=True)
    n_cached = len(model.inputs)
    uncached = run(model, pattern, use_cache=False)
    assert torch.equal(cached, uncached)
    assert len(model.inputs) == n_cached  # one forward per generated column either way
    # The reference re-runs the whole sequence: its inputs grow by one column per step.
    assert [x.shape[-1] for x in model.inputs] == \
        list(range(2, 2 + pattern.length(N_FRAMES)))[:n_cached]


def test_batched_equals_one_by_one(setup):
    pattern, model = setup
    seeds = [11, 22, 33]
    batched = run(model, pattern, SAMPLE, batch=3, seeds=seeds)
    for row, seed in enumerate(seeds):
        alone = run(model, pattern, SAMPLE, batch=1, seeds=[seed])
        assert torch.equal(alone[0], batched[row])
    assert not torch.equal(batched[0], batched[1])  # the seeds do matter


def test_continuation_keeps_the_prompt_and_prefills_it(setup):
    pattern, model = setup
    full = run(model, pattern)  # greedy, no prompt
    n_plain = len(model.inputs)
    assert n_plain == pattern.length(N_FRAMES)  # the last column is never fed back
    n_prompt = 2
    prompt = torch.randint(0, CB, (2, K, n_prompt))
    cont = run(model, pattern, prompt_codes=prompt)
    assert torch.equal(cont[..., :n_prompt], prompt)
    expected_forwards = {"flatten": K * (N_FRAMES - n_prompt),
                         "delay": N_FRAMES - n_prompt + K - 1,
                         "parallel": N_FRAMES - n_prompt}[pattern.kind]
    assert len(model.inputs) == expected_forwards
    first_generated = {"flatten": K * n_prompt, "delay": n_prompt, "parallel": n_prompt}
    assert model.inputs[0].shape[-1] == 2 + first_generated[pattern.kind]  # one prefill
    assert all(x.shape[-1] == 1 for x in model.inputs[1:])
    # Continuing greedy codes from their own first frames changes nothing.
    again = run(model, pattern, prompt_codes=full[..., :n_prompt])
    assert torch.equal(again, full)


def test_delay_forward_count_is_frames_plus_levels():
    pattern, model = stream_pattern("delay", K, CB), tiny(K)
    for n_frames in (1, 4, 9):
        run(model, pattern, n_frames=n_frames)
        assert len(model.inputs) == n_frames + K - 1  # prefill included, never n_frames * K


@pytest.mark.parametrize("use_cache", [True, False])
def test_delay_logits_never_see_the_code_they_predict(use_cache):
    """The forward whose logits choose slot (level k, frame t) has seen only frames < t of
    level k, and already every level < k of frame t, and exactly what was returned."""
    pattern, model = stream_pattern("delay", K, CB), tiny(K, seed=1)
    codes = run(model, pattern, SAMPLE, use_cache=use_cache)
    laid = pattern.apply(codes + OFFSET, fill=PAD)  # (B, K, L): the sequence as it was fed
    frames, levels = pattern.slot_frames(N_FRAMES), pattern.slot_levels(N_FRAMES)
    seen = torch.zeros(2, K, 0, dtype=torch.long)
    for column, ids in enumerate(model.inputs):  # forward `column` chooses layout column
        seen = torch.cat([seen, ids], -1) if use_cache else ids
        assert torch.equal(seen[..., :2], prefix_for(pattern))
        assert torch.equal(seen[..., 2:], laid[..., :column])
        for k in range(K):
            t = int(frames[k, column])
            if t < 0:
                continue
            assert int(levels[k, column]) == k
            assert (frames[k, :column] < t).all()  # level k: only earlier frames
            for lower in range(k):
                assert (frames[lower, :column] == t).any()  # lower levels of frame t: seen


def test_a_config_banning_the_pad_id_still_fills_empty_slots():
    pattern, model = stream_pattern("delay", K, CB), tiny(K)
    config = DecodingConfig(strategy="sample", seed=3, banned_token_ids=(PAD, BOS))
    codes = run(model, pattern, config)
    assert ((codes >= 0) & (codes < CB)).all()
    fed = torch.cat(model.inputs, -1)[..., 2:]  # the layout columns that were fed back
    assert torch.equal(fed, pattern.apply(codes + OFFSET, fill=PAD)[..., :fed.shape[-1]])


def test_flatten_accepts_a_2d_prefix_and_reports_progress():
    pattern, model = stream_pattern("flatten", K, CB), tiny(1)
    calls = []
    model.train()
    codes = generate_codes(model, torch.tensor([[BOS, BOA]]), pattern, 2, GREEDY,
                           code_offset=OFFSET, fill_id=PAD,
                           on_step=lambda done, total: calls.append((done, total)))
    assert codes.shape == (1, K, 2) and model.training  # the mode is restored
    assert calls == [(i, 2 * K) for i in range(1, 2 * K + 1)]


def test_bad_requests_are_refused():
    delay, flat = stream_pattern("delay", K, CB), stream_pattern("flatten", K, CB)
    model = tiny(K)
    ok = dict(code_offset=OFFSET, fill_id=PAD)
    prefix = prefix_for(delay, 1)

    def refused(match, *, model=model, pattern=delay, n_frames=N_FRAMES, config=GREEDY,
                prefix=prefix, **kwargs):
        with pytest.raises(ValueError, match=match):
            generate_codes(model, prefix, pattern, n_frames, config, **{**ok, **kwargs})

    refused("n_streams=3 but the flatten pattern", pattern=flat)
    refused("max_seq_len=64", n_frames=63)
    refused(r"prompt_codes must be int64 \(B=1, K=3", prompt_codes=torch.zeros(1, 2, 2).long())
    refused(r"prompt_codes has ids \[5\] outside the codebook \[0, 5\)",
            prompt_codes=torch.full((1, K, 2), CB))
    refused("more than n_frames", prompt_codes=torch.zeros(1, K, N_FRAMES + 1).long())
    refused("strategy='beam' is not supported for multi-stream",
            config=DecodingConfig(strategy="beam", num_beams=2))
    refused("cfg_scale=2.0 is not supported", config=DecodingConfig(cfg_scale=2.0))
    refused(r"prefix must have shape \(B, 3, P\)", prefix=prefix[:, :2])
    refused("code_offset=38", code_offset=38)
    refused("seeds has 2 entries", seeds=[1, 2])
    refused("no code is allowed", config=DecodingConfig(strategy="greedy",
                                                        banned_token_ids=tuple(range(4, 9))))
