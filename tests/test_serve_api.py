"""`armodal serve` over HTTP: the official openai client, 64 concurrent clients against offline
generate(), every bad input as its 4xx, limits, disconnects, logs and graceful shutdown.

A real uvicorn server on a free loopback port runs in a background thread; the cases that
need an engine in a chosen state (a full queue, a timeout) talk to the app in process.
"""

import asyncio
import json
import logging
import socket
import threading
import time

import httpx
import openai
import pytest
import torch

from armodal.checkpoint import load_run, save_run
from armodal.cli import main
from armodal.generation import DecodingConfig, generate
from armodal.model import ModelConfig, Transformer
from armodal.serve.app import create_app
from armodal.serve.engine import Engine, GenerationRequest
from armodal.serve.server import build_server
from armodal.serve.settings import ServerSettings
from armodal.textgen import decode_text, encode_prompt
from armodal.tokenizers.space import TokenSpace
from armodal.tokenizers.text import ByteTokenizer

KEY = "test-key"
TOK = ByteTokenizer()
SPACE = TokenSpace.for_tokenizers(TOK)


# Tiny models on a shared CPU: one torch thread (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=SPACE.vocab_size, n_layer=2, n_head=4,
                                    d_model=64, max_seq_len=128, init_std=0.3))
    path = save_run(tmp_path_factory.mktemp("serve") / "tiny", model, SPACE, TOK)
    return load_run(path)


class Server:
    """armodal's uvicorn server in a background thread on a free loopback port."""

    def __init__(self, run, settings: ServerSettings, engine: Engine | None = None):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = build_server(run, settings, "warning", engine)
        self.engine = self.server.engine
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def server(run):
    settings = ServerSettings(api_key=KEY, max_batch=16, max_queue=64, max_prompt_tokens=64,
                              max_tokens_limit=100, model_name="tiny")
    with Server(run, settings) as s:
        yield s


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def offline(run, prompt: str, **decoding):
    """What generate() gives for the request alone: eos stops a row, as the server sets it."""
    decoding.setdefault("stop_token_ids", (SPACE.eos_id,))
    return generate(run.model, [encode_prompt(TOK, SPACE, prompt)], DecodingConfig(**decoding),
                    decode=lambda ids: decode_text(TOK, SPACE, ids))


def test_openai_client_completion_equals_offline_generate(client, run):
    greedy = client.completions.create(model="tiny", prompt="def main():", max_tokens=12,
                                       temperature=0)
    want = offline(run, "def main():", max_new_tokens=12, temperature=0.0)
    assert greedy.choices[0].text == want.texts[0]
    assert greedy.choices[0].finish_reason == ("length" if want.finish_reasons[0] == "length"
                                               else "stop")
    assert greedy.usage.completion_tokens == len(want.sequences[0])
    sampled = client.completions.create(model="tiny", prompt="Once", max_tokens=20, seed=11,
                                        temperature=0.9, top_p=0.8,
                                        extra_body={"top_k": 20, "repetition_penalty": 1.1})
    want = offline(run, "Once", max_new_tokens=20, seed=11, temperature=0.9, top_p=0.8,
                   top_k=20, repetition_penalty=1.1)
    assert sampled.choices[0].text == want.texts[0]
    assert client.models.list().data[0].id == "tiny"


def test_openai_client_streaming_n_and_logprobs(client, run):
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=15, n=3, seed=4,
                                       logprobs=2, stream=True,
                                       stream_options={"include_usage": True})
    texts, logprobs, tops, usage = {}, {}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            logprobs.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
            tops.setdefault(choice.index, []).extend(choice.logprobs.top_logprobs)
    want = offline(run, "abc", max_new_tokens=15, seed=4, num_return_sequences=3, top_logprobs=2)
    assert [texts[i] for i in range(3)] == want.texts
    for i in range(3):
        torch.testing.assert_close(torch.tensor(logprobs[i]), torch.tensor(want.logprobs[i]),
                                   atol=1e-4, rtol=1e-4)
        assert all(len(top) <= 2 for top in tops[i]) and len(tops[i]) == len(want.logprobs[i])
    assert usage.completion_tokens == sum(len(s) for s in want.sequences)

    whole = client.completions.create(model="tiny", prompt="abc", max_tokens=15, n=3, seed=4,
                                      logprobs=2)
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == want.texts
    first = whole.choices[0].logprobs
    assert len(first.tokens) == len(first.token_logprobs) == len(want.sequences[0])


def _requests(n: int) -> list[dict]:
    """Mixed settings per request: greedy, filtered sampling, penalties, stop strings, n=2."""
    kinds = [dict(temperature=0), dict(temperature=0.7, top_k=8), dict(top_p=0.9, min_p=0.05),
             dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.2),
             dict(stop=["e", "\n"], min_tokens=2), dict(n=2, typical_p=0.8)]
    return [dict(model="tiny", prompt=f"client {i}: " + "x" * (i % 7), max_tokens=8 + i % 13,
                 seed=1000 + i, stream=i % 4 >= 2, **kinds[i % len(kinds)]) for i in range(n)]


def _offline_for(run, body: dict) -> list[str]:
    fields = dict(max_new_tokens=body["max_tokens"], seed=body["seed"],
                  temperature=body.get("temperature", 1.0), top_k=body.get("top_k"),
                  top_p=body.get("top_p"), min_p=body.get("min_p"),
                  typical_p=body.get("typical_p"),
                  presence_penalty=body.get("presence_penalty", 0.0),
                  frequency_penalty=body.get("frequency_penalty", 0.0),
                  repetition_penalty=body.get("repetition_penalty", 1.0),
                  stop_strings=tuple(body.get("stop", ())),
                  min_new_tokens=body.get("min_tokens", 0),
                  num_return_sequences=body.get("n", 1))
    return offline(run, body["prompt"], **fields).texts


async def _one_client(http: httpx.AsyncClient, body: dict) -> list[str]:
    texts: dict[int, str] = {}
    if not body["stream"]:
        response = await http.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        return [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
    async with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return [texts[i] for i in sorted(texts)]


def test_64_concurrent_clients_each_equal_offline_generate(server, run):
    bodies = _requests(64)

    async def all_clients():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as http:
            return await asyncio.gather(*(_one_client(http, b) for b in bodies))

    results = asyncio.run(all_clients())
    for body, got in zip(bodies, results):
        assert got == _offline_for(run, body), body


BAD = [
    (b'{"model": "tiny", "prompt": "a",', 400, None, None),  # malformed JSON
    (b'["model", "tiny"]', 400, None, None),  # not an object
    ({"model": "tiny", "prompt": "a", "bogus": 1}, 400, "bogus", "unknown_parameter"),
    ({"prompt": "a"}, 400, "model", "missing_required_parameter"),
    ({"model": "tiny"}, 400, "prompt", "missing_required_parameter"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "n": 1.5}, 400, "n", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "stream": "yes"}, 400, "stream", "invalid_value"),
    ({"model": "tiny", "prompt": 5}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": [1, "a"]}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": []}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": [[]]}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": [1, 99999]}, 400, "prompt", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "temperature": 2.5}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "top_k": 0}, 400, "top_k", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "min_p": 1.5}, 400, "min_p", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "logprobs": 9}, 400, "logprobs", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "presence_penalty": 3}, 400, "presence_penalty",
     "invalid_value"),
    ({"model": "tiny", "prompt": "a", "repetition_penalty": 0}, 400, "repetition_penalty",
     "invalid_value"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 101}, 400, "max_tokens", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 10, "min_tokens": 11}, 400, "min_tokens",
     "invalid_value"),
    ({"model": "tiny", "prompt": "a", "n": 17}, 400, "n", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "seed": 2**70}, 400, "seed", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop",
     "invalid_value"),
    ({"model": "tiny", "prompt": "a", "stop": [""]}, 400, "stop", "invalid_value"),
    ({"model": "tiny", "prompt": "a", "echo": True}, 400, "echo", "unsupported_parameter"),
    ({"model": "tiny", "prompt": "a", "logit_bias": {"5": 1}}, 400, "logit_bias",
     "unsupported_parameter"),
    ({"model": "tiny", "prompt": "a" * 64}, 400, "prompt", "context_length_exceeded"),
    ({"model": "tiny", "prompt": "a" * 60, "max_tokens": 70}, 400, "max_tokens",
     "context_length_exceeded"),
    ({"model": "other", "prompt": "a"}, 404, "model", "model_not_found"),
    (b'{"model": "tiny", "prompt": "\\ud800"}', 400, "prompt", "invalid_value"),  # not text
    (b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, "temperature",
     "invalid_value"),
    (b'{"model": "tiny", "prompt": "' + b"a" * 5 * 2**20 + b'"}', 413, None, "request_too_large"),
]


@pytest.mark.parametrize("body, status, param, code", BAD,
                         ids=[f"{i}-{b[2] or 'body'}" for i, b in enumerate(BAD)])
def test_bad_input_gets_its_4xx_and_the_server_keeps_serving(server, body, status, param, code):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers=headers)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] == "invalid_request_error"
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bad_requests_leak_nothing_into_good_ones(server, run):
    """Interleave refused and valid requests: the valid ones still equal offline generate."""
    body = dict(model="tiny", prompt="steady", max_tokens=10, seed=3)
    headers = {"Authorization": f"Bearer {KEY}"}
    for bad, *_ in BAD[:6]:
        raw = bad if isinstance(bad, bytes) else json.dumps(bad).encode()
        httpx.post(f"{server.url}/v1/completions", content=raw, headers=headers)
        good = httpx.post(f"{server.url}/v1/completions", json=body, headers=headers)
        assert good.json()["choices"][0]["text"] == offline(run, "steady", max_new_tokens=10,
                                                            seed=3).texts[0]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic test-key", KEY])
def test_api_key_guards_every_v1_route_and_leaves_health_open(server, auth):
    headers = {} if auth is None else {"Authorization": auth}
    for method, path in [("POST", "/v1/completions"), ("GET", "/v1/models"),
                         ("POST", "/v1/media"), ("GET", "/v1/anything")]:
        response = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/").status_code in (200, 404)  # the playground, or none


def test_openai_client_raises_on_wrong_key(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="a", max_tokens=2)


class SlowModel(torch.nn.Module):
    """The run's model, 5 ms slower per forward: a request runs long enough to walk away from."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.config = model, model.config

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def forward(self, *args, **kwargs):
        time.sleep(0.005)
        return self.inner(*args, **kwargs)


@pytest.fixture(scope="module")
def slow_server(run):
    settings = ServerSettings(model_name="tiny")
    engine = Engine(SlowModel(run.model), max_batch=4)
    with Server(run, settings, engine) as s:
        yield s, engine


LONG = dict(model="tiny", prompt="long", max_tokens=100, min_tokens=100, ignore_eos=True)


def _rows_freed_early(http: httpx.Client, engine: Engine, tokens_before: int) -> None:
    deadline = time.monotonic() + 10
    while http.get("/health").json()["running_rows"] != 0:
        assert time.monotonic() < deadline, "the disconnected request kept its row"
        time.sleep(0.02)
    assert engine.stats.tokens - tokens_before < 100, "it ran to the end regardless"


def test_disconnected_stream_frees_its_row(slow_server):
    server, engine = slow_server
    before = engine.stats.tokens
    with httpx.Client(base_url=server.url) as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as response:
            first = next(response.iter_lines())
            assert first.startswith("data: ") and "error" not in first, first
            assert http.get("/health").json()["running_rows"] == 1  # counted once it joined
        # leaving the block closes the connection mid-stream
        _rows_freed_early(http, engine, before)


def test_disconnected_plain_request_frees_its_row(slow_server):
    server, engine = slow_server
    before = engine.stats.tokens
    with httpx.Client(base_url=server.url) as http:
        with pytest.raises(httpx.ReadTimeout):
            http.post("/v1/completions", json=LONG, timeout=0.2)
        _rows_freed_early(http, engine, before)


def test_each_request_logs_one_json_line(server, caplog):
    caplog.set_level(logging.INFO, logger="armodal.serve")
    headers = {"Authorization": f"Bearer {KEY}"}
    httpx.post(f"{server.url}/v1/completions", headers=headers,
               json=dict(model="tiny", prompt="log me", max_tokens=5, seed=1))
    httpx.post(f"{server.url}/v1/completions", headers=headers, json={"model": "tiny"})
    deadline = time.monotonic() + 5
    while len([r for r in caplog.records if r.name == "armodal.serve"]) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "armodal.serve"]
    ok, bad = lines[-2], lines[-1]
    assert ok["status"] == 200 and ok["path"] == "/v1/completions"
    assert ok["id"].startswith("cmpl-") and ok["completion_tokens"] == 5
    assert ok["prompt_tokens"] == 7 and ok["ttft_s"] <= ok["latency_s"]
    assert bad["status"] == 400 and "prompt" in bad["error"]


def _in_process(app):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


def test_full_queue_answers_429_with_retry_after(run):
    # The engine is never started here, so queued requests stay queued.
    settings = ServerSettings(max_batch=1, max_queue=1, model_name="tiny")
    engine = Engine(run.model, max_batch=1, max_queue=1)
    engine.submit(GenerationRequest([1, 5], DecodingConfig(max_new_tokens=2)), lambda e: None)
    app = create_app(run, settings, engine=engine)

    async def ask():
        async with _in_process(app) as http:
            return await http.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    response = asyncio.run(ask())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "1"
    assert response.json()["error"]["code"] == "queue_full"


def test_request_timeout_answers_408(run):
    settings = ServerSettings(request_timeout_s=1e-6, model_name="tiny")
    engine = Engine(run.model)
    app = create_app(run, settings, engine=engine)
    engine.start()
    try:
        async def ask():
            async with _in_process(app) as http:
                body = {"model": "tiny", "prompt": "a", "max_tokens": 50}
                return await http.post("/v1/completions", json=body)
        response = asyncio.run(ask())
    finally:
        engine.stop()
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"


def _during_shutdown(run, grace_s: float, stream: bool) -> httpx.Response:
    """A long request (>= 0.5 s) on a server asked to stop while it runs."""
    engine = Engine(SlowModel(run.model))
    result = {}
    with Server(run, ServerSettings(model_name="tiny", shutdown_grace_s=grace_s), engine) as s:
        def ask():
            with httpx.Client(base_url=s.url, timeout=60) as http:
                response = http.post("/v1/completions", json={**LONG, "stream": stream})
                result["response"], result["text"] = response, response.text
        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 10
        while engine.stats.running_rows == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    # __exit__ asked uvicorn to stop and waited until it had
    asker.join(30)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{s.url}/health")
    return result["response"]


def test_graceful_shutdown_lets_the_running_request_finish(run):
    response = _during_shutdown(run, grace_s=10, stream=False)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 100


@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_past_the_grace_ends_requests_with_an_answer(run, stream):
    response = _during_shutdown(run, grace_s=0.05, stream=stream)
    if stream:  # the headers went out already: the stream ends with an error event
        events = [line for line in response.text.splitlines() if line.startswith("data: ")]
        assert json.loads(events[-1][6:])["error"]["code"] == "shutting_down"
        assert len(events) < 100
    else:
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"


@pytest.mark.parametrize("options, message", [
    (["max_batch=0"], "max_batch=0; expected an int >= 1"),
    (["port=http"], "port='http'"),
    (["max_bach=4"], "did you mean max_batch?"),
    (["log_level=loud"], "log_level='loud'"),
    (["run=???"], "run is required"),
    (["run=/no/such/run"], "does not exist"),
])
def test_cli_bad_option_is_one_line(run, capsys, options, message):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", f"run={run.path}", *options])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err and err.startswith("armodal serve: error:")
