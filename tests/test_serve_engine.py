"""The continuous-batching engine equals offline generate(), request by request.

Requests join and leave a running batch at different steps, with different settings per row;
each request's tokens, texts and finish reasons must be exactly those of generate() on that
request alone, its logprobs equal up to float rounding across batch shapes.
"""

import threading

import pytest
import torch

import armodal.serve.engine as engine_module
from armodal.generation import DecodingConfig, generate
from armodal.model import ModelConfig, Transformer
from armodal.serve.engine import (
    Engine,
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenOut,
)
from armodal.textgen import decode_text, encode_prompt
from armodal.tokenizers.space import TokenSpace
from armodal.tokenizers.text import ByteTokenizer

TOK = ByteTokenizer()
SPACE = TokenSpace.for_tokenizers(TOK)
EOS = SPACE.eos_id


# Tiny models on a shared CPU: one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def decode(ids: list[int]) -> str:
    return decode_text(TOK, SPACE, ids)


def tiny_model(max_seq_len: int = 96, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    # A larger init than training's makes the random model's distributions peaked enough that
    # greedy, top-k and top-p all matter.
    config = ModelConfig(vocab_size=SPACE.vocab_size, n_layer=2, n_head=4, n_kv_head=2,
                         d_model=64, max_seq_len=max_seq_len, init_std=0.3)
    return Transformer(config).eval()


def ids(text: str) -> list[int]:
    return encode_prompt(TOK, SPACE, text)


class Collector:
    """on_event for one request: every event, in order."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, event) -> None:
        self.events.append(event)
        if isinstance(event, Finished):
            self.done.set()

    @property
    def finished(self) -> Finished | None:
        last = self.events[-1] if self.events else None
        return last if isinstance(last, Finished) else None

    def rows(self, n: int):
        tokens, logprobs, reasons = [[] for _ in range(n)], [[] for _ in range(n)], [None] * n
        text = [""] * n
        for e in self.events:
            if isinstance(e, TokenOut):
                tokens[e.row].append(e.token)
                logprobs[e.row].append(e.logprob)
                text[e.row] += e.text
                reasons[e.row] = e.finish_reason or reasons[e.row]
        return tokens, logprobs, reasons, text


def assert_matches_offline(model, prompt, config, got: Collector):
    want = generate(model, [prompt], config, decode=decode)
    n = config.num_return_sequences
    tokens, logprobs, reasons, streamed = got.rows(n)
    assert got.finished is not None and got.finished.reason == "done", got.finished
    assert tokens == want.sequences
    assert reasons == want.finish_reasons
    assert got.finished.texts == want.texts
    assert streamed == want.texts  # the streamed pieces join to the final text
    for mine, theirs in zip(logprobs, want.logprobs):
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), atol=1e-4,
                                   rtol=1e-4)


def cfg(**kw) -> DecodingConfig:
    kw.setdefault("stop_token_ids", (EOS,))
    return DecodingConfig(**kw)


# Mixed settings: greedy, plain sampling, filters, penalties, n > 1, stop strings, min tokens.
CASES = [
    ("def f(x):", cfg(strategy="greedy", max_new_tokens=14)),
    ("hello", cfg(temperature=0.8, seed=1, max_new_tokens=20)),
    ("The quick brown fox", cfg(temperature=1.3, top_k=5, seed=2, max_new_tokens=9)),
    ("a", cfg(top_p=0.7, seed=3, max_new_tokens=25, num_return_sequences=3)),
    ("import torch\n", cfg(min_p=0.2, repetition_penalty=1.3, seed=4, max_new_tokens=17)),
    ("xy", cfg(temperature=0, presence_penalty=0.5, frequency_penalty=0.3, max_new_tokens=12,
               no_repeat_ngram_size=2)),
    ("stop here", cfg(seed=5, max_new_tokens=30, stop_strings=("e", "a"), min_new_tokens=3)),
    ("typical", cfg(typical_p=0.6, seed=6, max_new_tokens=11, top_logprobs=3)),
    ("ban", cfg(seed=7, max_new_tokens=8, banned_token_ids=tuple(range(100, 200)))),
    # Three choices, eos among them: min_new_tokens decides when a row may stop.
    ("hi", cfg(seed=8, max_new_tokens=12, min_new_tokens=4, allowed_token_ids=(104, 105))),
    ("hi", cfg(seed=9, max_new_tokens=12, min_new_tokens=2, allowed_token_ids=(104, 105),
               num_return_sequences=4)),
]


def test_staggered_joins_and_leaves_equal_offline_generate():
    model = tiny_model()
    engine = Engine(model, max_batch=8, max_queue=16)
    collectors = [Collector() for _ in CASES]
    # Request i joins at step 2 * i: the batch always holds rows at different steps, rows
    # of several settings, and rows leaving while others join (n=3 takes three rows).
    for step in range(400):
        if step % 2 == 0 and step // 2 < len(CASES):
            prompt, config = CASES[step // 2]
            engine.submit(GenerationRequest(ids(prompt), config, decode), collectors[step // 2])
        if not engine.step() and step // 2 >= len(CASES):
            break
    for (prompt, config), got in zip(CASES, collectors):
        assert_matches_offline(model, ids(prompt), config, got)


@pytest.mark.parametrize("prefill_tokens", [4096, 24])
def test_simultaneous_arrivals_prefill_together(monkeypatch, prefill_tokens):
    """Prompts of different lengths arriving at once share left-padded prefill forwards (all
    in one, or split by the token budget); each request still equals generate() alone."""
    monkeypatch.setattr(engine_module, "PREFILL_TOKENS", prefill_tokens)
    model = tiny_model()
    engine = Engine(model, max_batch=16)
    collectors = [Collector() for _ in CASES]
    for (prompt, config), got in zip(CASES, collectors):
        engine.submit(GenerationRequest(ids(prompt), config, decode), got)
    while engine.step():
        pass
    for (prompt, config), got in zip(CASES, collectors):
        assert_matches_offline(model, ids(prompt), config, got)


def test_full_batch_queues_then_admits_in_order():
    model = tiny_model()
    engine = Engine(model, max_batch=2, max_queue=16)
    requests = [(ids(f"prompt {i}" * (i + 1)), cfg(seed=i, max_new_tokens=5 + 3 * i))
                for i in range(6)]
    collectors = [Collector() for _ in requests]
    for (prompt, config), got in zip(requests, collectors):
        engine.submit(GenerationRequest(prompt, config, decode), got)
    while engine.step():
        assert engine.stats.running_rows <= 2
    for (prompt, config), got in zip(requests, collectors):
        assert_matches_offline(model, prompt, config, got)


def test_cache_compaction_and_long_prompt_joining_late():
    """A short context forces the shared slot index to the end (compaction), and a prompt
    longer than the slots written so far makes every row skip ahead; neither changes output."""
    model = tiny_model(max_seq_len=40)
    engine = Engine(model, max_batch=4)
    plan = [(0, ids("ab"), cfg(seed=1, max_new_tokens=36)),  # runs the whole time
            (3, ids("x" * 30), cfg(strategy="greedy", max_new_tokens=9)),  # P > pos
            (12, ids("mid"), cfg(seed=2, max_new_tokens=30, repetition_penalty=1.2)),
            (20, ids("late prompt" * 2), cfg(seed=3, max_new_tokens=15))]
    collectors = [Collector() for _ in plan]
    for step in range(200):
        for (at, prompt, config), got in zip(plan, collectors):
            if at == step:
                engine.submit(GenerationRequest(prompt, config, decode), got)
        if not engine.step() and step > 20:
            break
    for (_, prompt, config), got in zip(plan, collectors):
        assert_matches_offline(model, prompt, config, got)


def test_cancelled_request_frees_its_slot_for_the_next():
    model = tiny_model()
    engine = Engine(model, max_batch=2)
    long_a, long_b, waiting = Collector(), Collector(), Collector()
    ticket = engine.submit(GenerationRequest(ids("a"), cfg(seed=0, max_new_tokens=60,
                                                             min_new_tokens=60), decode), long_a)
    engine.submit(GenerationRequest(ids("b"), cfg(seed=1, max_new_tokens=60,
                                                  min_new_tokens=60), decode), long_b)
    config = cfg(seed=9, max_new_tokens=10)
    engine.submit(GenerationRequest(ids("c"), config, decode), waiting)
    for _ in range(3):
        engine.step()
    assert engine.stats.waiting == 1 and not waiting.events  # both rows taken
    ticket.cancel()
    engine.step()
    assert long_a.finished.reason == "cancelled"
    assert waiting.events, "the freed row takes the waiting request at the next boundary"
    while engine.step():
        pass
    assert_matches_offline(model, ids("c"), config, waiting)
    assert long_b.finished.reason == "done" and len(long_b.rows(1)[0][0]) == 60


def test_timeout_queue_bound_and_closed_engine():
    model = tiny_model()
    engine = Engine(model, max_batch=1, max_queue=2)
    slow, queued = Collector(), Collector()
    engine.submit(GenerationRequest(ids("a"), cfg(max_new_tokens=50, min_new_tokens=50),
                                    timeout_s=0.0), slow)
    engine.submit(GenerationRequest(ids("b"), cfg(max_new_tokens=5)), queued)
    with pytest.raises(QueueFull):
        engine.submit(GenerationRequest(ids("c"), cfg(max_new_tokens=5)), Collector())
    while engine.step():
        pass
    assert slow.finished.reason == "timeout"
    assert queued.finished.reason == "done"
    engine.stop()
    with pytest.raises(EngineClosed):
        engine.submit(GenerationRequest(ids("d"), cfg(max_new_tokens=5)), Collector())


@pytest.mark.parametrize("config, prompt, match", [
    (cfg(strategy="beam", num_beams=2), [1, 5], "strategy='beam'"),
    (cfg(max_new_tokens=95), [1, 5, 6], "context of 96"),
    (cfg(num_return_sequences=9), [1], "n=9"),
    (cfg(), [], "non-empty"),
    (cfg(), [1, 10_000], r"\[0, 259\)"),
    (cfg(stop_token_ids=(999,)), [1], "stop_token_ids"),
])
def test_bad_requests_are_refused_before_queueing(config, prompt, match):
    engine = Engine(tiny_model(), max_batch=8)
    with pytest.raises(ValueError, match=match):
        engine.submit(GenerationRequest(prompt, config), Collector())
    assert engine.stats.requests == 0


def test_thread_serves_concurrent_submissions_and_stops_cleanly():
    model = tiny_model()
    engine = Engine(model, max_batch=4, max_queue=32)
    engine.start()
    requests = [(ids(f"req {i}"), cfg(seed=i, max_new_tokens=4 + i % 5)) for i in range(12)]
    collectors = [Collector() for _ in requests]
    threads = [threading.Thread(target=engine.submit,
                                args=(GenerationRequest(p, c, decode), got))
               for (p, c), got in zip(requests, collectors)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in collectors:
        assert got.done.wait(30)
    never_done = Collector()
    engine.submit(GenerationRequest(ids("z"), cfg(max_new_tokens=90, min_new_tokens=90)),
                  never_done)
    engine.stop(grace_s=0.0)
    assert never_done.finished.reason == "shutdown"
    for (p, c), got in zip(requests, collectors):
        assert_matches_offline(model, p, c, got)
