"""Attention sinks (StreamingLLM): a bounded cache of the first positions plus a recent window.

Equal to the plain cache while the sequence fits, equal to an independent reference (explicit
per-query attention over the kept positions, at cache positions) past it, bounded forever.
"""

from __future__ import annotations

import math

import pytest
import torch

from armodal.cli import main
from armodal.generation import DecodingConfig, generate
from armodal.model import KVCache, ModelConfig, Transformer

V = 48
PROMPTS = [[1, 2, 3, 4, 5], [7], [9, 10, 11]]


@pytest.fixture(autouse=True)
def one_thread():
    # The models are tiny; on a shared 2-core machine a second thread mostly waits for a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    # A large init_std gives peaked logits, so greedy argmax is not decided by float noise.
    kw = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=16,
              init_std=0.3)
    return Transformer(ModelConfig(**{**kw, **overrides})).eval()


def greedy(**kw) -> DecodingConfig:
    return DecodingConfig(strategy="greedy", **{"max_new_tokens": 12, **kw})


def streaming_reference(model: Transformer, idx: torch.Tensor, sinks: int,
                        window: int) -> torch.Tensor:
    """Logits (B, N, V) as StreamingLLM defines them, written out per query: query i sees key
    j <= i when j < sinks or i - j < window; RoPE puts the query at min(i, sinks + window - 1)
    and every visible key at its distance from it, except that the sinks sit at 0..sinks-1.
    No cache, no ring, no slots: an explicit (query, key) grid of positions and one softmax."""
    c = model.config
    n, d = idx.shape[1], c.head_dim
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]  # (N, 1), (1, N)
    visible = (j <= i) & ((j < sinks) | (i - j < window))  # (N, N)
    q_at = i.clamp(max=sinks + window - 1)  # (N, 1)
    k_at = torch.where(j < sinks, j, q_at - (i - j)).clamp(min=0)  # (N, N): per query

    def rotate(x: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
        angles = at[..., None].float() * model.rope_inv_freq  # (..., D/2)
        angles = torch.cat([angles, angles], -1)  # (..., D): rotate-half layout, as Llama
        cos, sin = angles.cos(), angles.sin()
        x1, x2 = x[..., :d // 2], x[..., d // 2:]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    x = model.embed(idx)
    for block in model.blocks:
        a, h = block.attn, block.attn_norm(x)
        q = a.wq(h).view(-1, n, c.n_head, d).transpose(1, 2)  # (B, H, N, D)
        k = a.wk(h).view(-1, n, c.n_kv_head, d).transpose(1, 2)
        v = a.wv(h).view(-1, n, c.n_kv_head, d).transpose(1, 2)
        group = c.n_head // c.n_kv_head
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (B, H, N, D)
        q = rotate(q, q_at[:, 0])  # (B, H, N, D)
        k = rotate(k[:, :, None], k_at)  # (B, H, N, N, D): key j as query i sees it
        scores = (q[:, :, :, None] * k).sum(-1) / math.sqrt(d)  # (B, H, N, N)
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], n, -1)
        x = x + a.wo(out)
        x = x + block.mlp(block.mlp_norm(x))
    return model.head(model.norm(x))


def test_the_reference_is_the_plain_model_while_the_sequence_fits():
    model = tiny_model()
    idx = torch.randint(0, V, (2, 16))
    with torch.inference_mode():
        torch.testing.assert_close(streaming_reference(model, idx, 4, 12), model(idx),
                                   atol=1e-5, rtol=1e-5)


def test_sink_cache_equals_the_plain_cache_while_the_sequence_fits():
    """Up to exactly sinks + window positions, on a left-padded ragged batch (per-row
    positions, pads at -1): the same logits as the static cache."""
    model = tiny_model()
    rows = [[5, 6, 7, 8, 9], [1, 2], [3, 4, 5, 6]]
    idx = torch.tensor([[0] * (5 - len(r)) + r for r in rows])  # (3, 5), left-padded
    positions = torch.tensor([[-1] * (5 - len(r)) + list(range(len(r))) for r in rows])
    steps = torch.randint(0, V, (3, 11))  # 16 = sinks + window positions for the longest row
    with torch.inference_mode():
        outs = []
        for cache in (model.new_cache(3, 16), model.new_cache(3, 16, sinks=4)):
            parts = [model(idx, cache, positions=positions)]
            for t in range(11):
                parts.append(model(steps[:, t:t + 1], cache, positions=positions[:, -1:] + 1 + t))
            outs.append(torch.cat(parts, 1))
    real = torch.cat([positions >= 0, torch.ones(3, 11, dtype=torch.bool)], 1)  # (3, 16)
    torch.testing.assert_close(outs[1][real], outs[0][real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sinks, window, model_kw", [
    (2, 6, {}), (0, 7, {}), (3, 9, {"n_kv_head": 4}), (2, 5, {"sliding_window": 6}),
])
def test_sink_cache_equals_the_reference_past_the_window(sinks, window, model_kw):
    """Far past the cache and the model's max_seq_len (16): a prefill longer than the cache,
    then one token at a time, against the explicit per-query reference."""
    model = tiny_model(**model_kw)
    idx = torch.randint(0, V, (2, 48))
    with torch.inference_mode():
        reference = streaming_reference(model, idx, sinks, window)
        cache = model.new_cache(2, sinks + window, sinks=sinks)
        steps = [model(idx[:, :13], cache)] + [model(idx[:, t:t + 1], cache)
                                               for t in range(13, 48)]
    torch.testing.assert_close(torch.cat(steps, 1), reference, atol=1e-4, rtol=1e-4)


def test_generate_with_sinks_matches_the_reference_and_batches_like_single_rows():
    """A ragged batch decodes each row as alone (its own positions, its own sinks), and each
    row's greedy tokens and logprobs are the reference's over its whole sequence."""
    model = tiny_model()
    config = greedy(max_new_tokens=40, attention_sinks=2, cache_window=6)
    batched = generate(model, PROMPTS, config)
    for row, prompt in enumerate(PROMPTS):
        alone = generate(model, [prompt], config)
        assert batched.sequences[row] == alone.sequences[0]
        new = alone.sequences[0]
        full = torch.tensor([prompt + new])
        with torch.inference_mode():
            logp = streaming_reference(model, full, 2, 6)[0].log_softmax(-1)
        logp = logp[len(prompt) - 1:-1]  # (40, V): the distributions the tokens came from
        assert new == logp.argmax(-1).tolist()
        chosen = logp.gather(-1, torch.tensor(new)[:, None]).squeeze(-1)
        assert batched.logprobs[row] == pytest.approx(chosen.tolist(), abs=1e-4)


def test_sink_cache_stays_bounded_over_thousands_of_steps():
    """2000 decode steps (125x max_seq_len): no cache tensor grows or is reallocated, the
    slots hold exactly the sinks and the most recent window, and the logits stay finite."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=32, n_layer=1, n_head=2, d_model=16,
                                    max_seq_len=16, init_std=0.3)).eval()
    sinks, window = 3, 5
    cache = model.new_cache(1, sinks + window, sinks=sinks)
    tensors = {"k": cache.k, "v": cache.v, "slot_pos": cache.slot_pos}
    shapes = {name: t.shape for name, t in tensors.items()}
    token = torch.ones(1, 1, dtype=torch.long)
    with torch.inference_mode():
        for step in range(2000):
            logits = model(token, cache)[:, -1]  # (1, V)
            token = logits.argmax(-1, keepdim=True)
            for name, t in tensors.items():
                now = getattr(cache, name)
                assert now.shape == shapes[name] and now.data_ptr() == t.data_ptr(), name
    assert torch.isfinite(logits).all()
    kept = sorted(cache.slot_pos[0].tolist())
    assert kept == [0, 1, 2] + list(range(2000 - window, 2000))


def test_generate_past_max_seq_len_with_sinks_only():
    model = tiny_model()
    with pytest.raises(ValueError, match="max_seq_len=16"):
        generate(model, PROMPTS, greedy(max_new_tokens=64))
    out = generate(model, PROMPTS, DecodingConfig(max_new_tokens=64, attention_sinks=4,
                                                  seed=0))  # sampling too
    assert [len(s) for s in out.sequences] == [64] * 3
    # A prompt longer than the whole cache is prefilled through it.
    long = generate(model, [list(range(1, 40))], greedy(attention_sinks=2, cache_window=6))
    assert len(long.sequences[0]) == 12


@pytest.mark.parametrize("kw, field", [
    ({"attention_sinks": -1}, "attention_sinks"), ({"attention_sinks": 2.0}, "attention_sinks"),
    ({"attention_sinks": 4, "cache_window": 0}, "cache_window"),
    ({"cache_window": 8}, "cache_window"),  # a window without sinks means nothing
    ({"attention_sinks": 4, "strategy": "beam", "num_beams": 2}, "attention_sinks"),
    ({"attention_sinks": 4, "speculative": "prompt_lookup"}, "attention_sinks"),
    ({"attention_sinks": 4, "compile": True}, "attention_sinks"),
    ({"attention_sinks": 4, "use_cache": False}, "attention_sinks"),
])
def test_bad_sink_settings_are_refused_by_the_config(kw, field):
    with pytest.raises(ValueError, match=f"invalid DecodingConfig: {field}=") as err:
        DecodingConfig(**kw)
    assert str(kw[field]) in str(err.value)


def test_sink_caches_the_model_cannot_hold_are_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"attention_sinks=4 \+ cache_window=13 = 17 .*16"):
        generate(model, PROMPTS, greedy(attention_sinks=4, cache_window=13))
    with pytest.raises(ValueError, match=r"attention_sinks=16 \+ cache_window=0"):
        generate(model, PROMPTS, greedy(attention_sinks=16))  # no room left for a window
    windowed = tiny_model(sliding_window=6)
    with pytest.raises(ValueError, match="at most 8 .*sliding_window=6"):
        generate(windowed, PROMPTS, greedy(attention_sinks=2, cache_window=7))
    config = model.config
    for kw, message in [({"max_len": 4, "sinks": -1}, "sinks=-1"),
                        ({"max_len": 4, "sinks": 4}, "window=0"),
                        ({"max_len": 17, "sinks": 1}, "at most 16"),
                        ({"max_len": 8, "sinks": 2, "rolling": True}, "not both")]:
        with pytest.raises(ValueError, match=message):
            KVCache(config, 1, **kw)
    with pytest.raises(ValueError, match="static cache"):
        model.new_cache(1, sinks=2).compact()


def test_multi_stream_code_generation_refuses_sinks():
    from armodal.generation.streams import generate_codes
    from armodal.tokenizers.patterns import stream_pattern

    pattern = stream_pattern("delay", 3, 5)
    model = tiny_model(n_streams=pattern.n_streams)
    with pytest.raises(ValueError, match="attention_sinks=4 is not supported for multi-stream"):
        generate_codes(model, torch.ones(1, pattern.n_streams, 2, dtype=torch.long), pattern,
                       4, greedy(attention_sinks=4), code_offset=4, fill_id=0)


def test_cli_generates_past_max_seq_len_with_sinks(tmp_path, capsys):
    """`armodal generate ... decoding.attention_sinks=4` writes 4x max_seq_len tokens; without
    sinks the same request is cut to the context and says so."""
    from armodal.checkpoint import save_run
    from armodal.tokenizers.space import TokenSpace
    from armodal.tokenizers.text import CharTokenizer

    tokenizer = CharTokenizer("abcdefgh ")
    space = TokenSpace({"text": tokenizer.vocab_size})
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=space.vocab_size, n_layer=1, n_head=2,
                                    d_model=16, max_seq_len=32))
    save_run(tmp_path / "run", model, space, tokenizer)
    specials = ",".join(str(i) for i in range(space.offset("text")))  # text only, no eos
    base = ["generate", f"run={tmp_path / 'run'}", "prompt=abc", "decoding=sample",
            "decoding.seed=0", f"decoding.banned_token_ids=[{specials}]",
            "decoding.max_new_tokens=128"]
    main([*base, "decoding.attention_sinks=4"])
    out, err = capsys.readouterr()
    assert len(out) == len("abc") + 128 + 1 and "cut" not in err
    main(base)
    out, err = capsys.readouterr()
    assert len(out) == len("abc") + 32 - 4 + 1 and "cut to 28" in err  # bos + abc
