"""The playground page and POST /v1/media: tiny random runs, a TestClient on a minimal app, the
real app factory, and a headless Chromium driving the page against a live uvicorn server."""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import threading
import time
from dataclasses import dataclass

import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from armodal.checkpoint import LoadedRun, load_run, save_run
from armodal.model import ModelConfig, Transformer
from armodal.serve.playground import MAX_IMAGES, add_playground_routes

CLASSES = ["zero", "one", "two"]


@dataclass
class Settings:
    """Stands in for the server's ServerSettings: the playground reads only these two."""

    api_key: str | None = None
    model_name: str | None = None


def tiny_model(vocab: int, seq: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2,
                                   d_model=16, max_seq_len=seq)).eval()


@pytest.fixture(scope="module")
def image_run(tmp_path_factory) -> LoadedRun:
    """A random, class-conditional 4x5 grey image run (8 levels), saved and loaded back."""
    from armodal.data.image_module import ImageLayout, image_space
    from armodal.tokenizers.image import PixelTokenizer

    tok = PixelTokenizer((4, 5), 1, levels=8)
    space = image_space(tok, CLASSES)
    layout = ImageLayout(space, True, CLASSES)
    path = save_run(tmp_path_factory.mktemp("image_run"), tiny_model(space.vocab_size, 32),
                    space, tok, extra={"image": layout.to_dict()})
    return load_run(path)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory) -> LoadedRun:
    """A random mu-law run at 4 kHz (one token per sample; Chromium plays WAVs from 3 kHz up),
    clips of 0.02 s."""
    from armodal.data.audio_module import audio_layout
    from armodal.tokenizers.audio import MuLawTokenizer

    tok = MuLawTokenizer(sample_rate=4000, bits=4)
    layout = audio_layout(tok, "flatten")
    meta = {"audio": {**layout.to_dict(), "sample_rate": 4000, "clip_seconds": 0.02}}
    path = save_run(tmp_path_factory.mktemp("audio_run"),
                    tiny_model(layout.space.vocab_size, 256), layout.space, tok, extra=meta)
    return load_run(path)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> LoadedRun:
    from armodal.tokenizers.space import TokenSpace
    from armodal.tokenizers.text import ByteTokenizer

    tok = ByteTokenizer()
    space = TokenSpace.for_tokenizers(tok)
    path = save_run(tmp_path_factory.mktemp("text_run"), tiny_model(space.vocab_size, 128),
                    space, tok)
    return load_run(path)


def client_for(run: LoadedRun, settings: Settings | None = None) -> TestClient:
    app = FastAPI()
    add_playground_routes(app, run, settings or Settings())
    return TestClient(app)


def png_size(data: bytes) -> tuple[int, int]:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()  # decodes every pixel: a truncated PNG fails here
        return img.size


def grid_size(n_per_row: int, rows: int, side: tuple[int, int]) -> tuple[int, int]:
    """torchvision's grid of (h, w) images scaled to >= 64 px, padding 2: (width, height)."""
    h, w = side
    scale = -(-64 // w)
    return n_per_row * (w * scale + 2) + 2, rows * (h * scale + 2) + 2


def assert_error(response, status: int, *words: str, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ---- POST /v1/media on a minimal app --------------------------------------------------------

def test_image_grid_is_a_png_with_one_row_per_class(image_run):
    client = client_for(image_run)
    r = client.post("/v1/media", json={"n": 3, "seed": 0, "classes": [0, 2], "temperature": 1.2})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-images"] == "6" and r.headers["x-images-per-row"] == "3"
    assert png_size(r.content) == grid_size(3, 2, (4, 5))
    again = client.post("/v1/media", json={"n": 3, "seed": 0, "classes": [0, 2],
                                           "temperature": 1.2})
    assert again.content == r.content  # seeded: the same request, the same grid
    every_class = client.post("/v1/media", json={"n": 1, "seed": 1, "cfg_scale": 2.0})
    assert png_size(every_class.content) == grid_size(1, len(CLASSES), (4, 5))
    assert not list(image_run.path.glob("generated*"))  # never writes into the run


def test_audio_gives_one_wav_or_a_json_list_at_the_runs_rate(audio_run):
    import soundfile as sf

    client = client_for(audio_run)
    r = client.post("/v1/media", json={"n": 1, "seed": 0, "seconds": 0.03})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    wave, rate = sf.read(io.BytesIO(r.content))
    assert rate == 4000 and wave.shape == (120,)
    default = client.post("/v1/media", json={"seed": 0})  # the run's clip length, 0.02 s
    assert sf.read(io.BytesIO(default.content))[0].shape == (80,)
    many = client.post("/v1/media", json={"n": 2, "seed": 0, "seconds": 0.01, "top_k": 4})
    body = many.json()
    assert body["object"] == "list" and body["sample_rate"] == 4000
    waves = [sf.read(io.BytesIO(base64.b64decode(item["b64_wav"])))[0] for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1]
    assert [w.shape for w in waves] == [(40,), (40,)]


@pytest.mark.parametrize("body,status,words,param", [
    ({"n": 0}, 400, ["n=0", "1 to 16"], "n"),
    ({"n": 17}, 400, ["n=17", "1 to 16"], "n"),
    ({"n": "2"}, 422, ["n='2'"], "n"),
    ({"seconds": 10.5}, 400, ["seconds=10.5", "at most 10"], "seconds"),
    ({"seconds": 0}, 400, ["seconds=0"], "seconds"),
    ({"seconds": -1}, 400, ["seconds=-1"], "seconds"),
    ({"temperature": -1}, 400, ["temperature=-1"], "temperature"),
    ({"top_p": 1.5}, 400, ["top_p=1.5"], "top_p"),
    ({"classes": [0]}, 400, ["classes=[0]", "image runs"], "classes"),
    ({"cfg_scale": 3}, 400, ["cfg_scale=3"], "cfg_scale"),
    ({"secs": 1}, 422, ["secs", "allowed fields", "seconds"], "secs"),
    ({"model": "gpt-4"}, 404, ["model='gpt-4'"], "model"),
])
def test_bad_audio_requests_get_openai_errors(audio_run, body, status, words, param):
    assert_error(client_for(audio_run).post("/v1/media", json=body), status, *words, param=param)


@pytest.mark.parametrize("body,status,words,param", [
    ({"classes": [3]}, 400, ["class id 3", "zero, one, two"], "classes"),  # trained: 0..2
    ({"classes": []}, 400, ["classes=[]"], "classes"),
    ({"classes": ["one"]}, 422, ["classes.0='one'"], "classes"),
    ({"n": 22}, 400, [f"{22 * len(CLASSES)} images", f"at most {MAX_IMAGES}"], "n"),
    ({"n": 65, "classes": [0]}, 400, ["n=65", f"1 to {MAX_IMAGES}"], "n"),
    ({"seconds": 1.0}, 400, ["seconds", "image run"], "seconds"),
    ({"temperature": None}, 422, ["temperature=None", "number"], "temperature"),
    ({"seed": 1.5}, 422, ["seed=1.5"], "seed"),
    ({"top_k": 0}, 400, ["top_k=0"], "top_k"),
])
def test_bad_image_requests_get_openai_errors(image_run, body, status, words, param):
    assert_error(client_for(image_run).post("/v1/media", json=body), status, *words, param=param)


def test_bodies_that_are_not_json_objects_are_refused(image_run):
    client = client_for(image_run)
    assert_error(client.post("/v1/media", content=b"{not json",
                             headers={"content-type": "application/json"}), 400, "not valid JSON")
    assert_error(client.post("/v1/media", json=[1, 2]), 400, "JSON list")


def test_a_text_run_is_refused_naming_its_modality(text_run):
    error = assert_error(client_for(text_run).post("/v1/media", json={"n": 1}), 400, "text",
                         "/v1/completions")
    assert error["code"] == "unsupported_modality"


def test_api_key_is_required_when_configured(image_run):
    client = client_for(image_run, Settings(api_key="sekret", model_name="digits"))
    refused = client.post("/v1/media", json={"n": 1})
    assert_error(refused, 401, "API key")
    assert refused.headers["www-authenticate"] == "Bearer"
    assert_error(client.post("/v1/media", json={"n": 1}, headers={"Authorization": "Bearer no"}),
                 401)
    ok = client.post("/v1/media", json={"n": 1, "classes": [1], "model": "digits"},
                     headers={"Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.headers["content-type"] == "image/png"
    info = client.get("/v1/playground/info", headers={"Authorization": "Bearer sekret"}).json()
    assert info["modality"] == "image" and info["model"] == "digits"
    assert info["classes"] == CLASSES
    assert client.get("/").status_code == 200  # the page itself is public; it asks for the key


def test_page_is_served_with_its_controls(audio_run):
    client = client_for(audio_run)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="max_tokens"', 'id="temperature"', 'id="top_p"',
                    'id="top_k"', 'id="seed"', 'id="api_key"', 'id="generate"', 'id="seconds"',
                    'id="classes"', "/v1/completions", "/v1/media", "/v1/models"):
        assert element in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN: works offline
    info = client.get("/v1/playground/info").json()
    assert info["modality"] == "audio" and info["seconds"] == 0.02
    assert info["model"] == audio_run.path.name


def test_generation_runs_one_request_at_a_time(image_run, monkeypatch):
    """Concurrent requests do not interleave on the shared model (the lock)."""
    import armodal.imagegen as imagegen

    active, most = [0], [0]
    real = imagegen.sample_images

    def counting(*args, **kwargs):
        active[0] += 1
        most[0] = max(most[0], active[0])
        time.sleep(0.05)
        try:
            return real(*args, **kwargs)
        finally:
            active[0] -= 1

    monkeypatch.setattr(imagegen, "sample_images", counting)
    client = client_for(image_run)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        client.post("/v1/media", json={"n": 1, "classes": [0]}).status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200, 200, 200] and most[0] == 1


# ---- the real app factory -------------------------------------------------------------------

def real_create_app():
    """armodal.serve.app.create_app: the server the page is served by."""
    from armodal.serve.app import create_app

    return create_app


def test_real_app_serves_the_page_and_guards_media_with_its_key(image_run):
    create_app = real_create_app()
    from armodal.serve.settings import ServerSettings

    app = create_app(image_run, ServerSettings(api_key="sekret", port=0))
    with TestClient(app) as client:  # `with`: runs the app's startup and shutdown
        page = client.get("/")
        assert page.status_code == 200 and 'id="generate"' in page.text
        assert client.post("/v1/media", json={"n": 1}).status_code == 401
        assert client.get("/v1/playground/info").status_code == 401
        key = {"Authorization": "Bearer sekret"}
        r = client.post("/v1/media", json={"n": 2, "classes": [1], "seed": 0}, headers=key)
        assert r.status_code == 200 and png_size(r.content) == grid_size(2, 1, (4, 5))
        info = client.get("/v1/playground/info", headers=key).json()
        assert info["modality"] == "image"


# ---- a live server and a headless Chromium --------------------------------------------------

def stub_text_app(run: LoadedRun) -> FastAPI:
    """The playground plus a small stand-in for the server's /v1/models and /v1/completions
    (armodal.textgen underneath), so the page is tested whatever state the server is in."""
    from fastapi.responses import StreamingResponse

    from armodal.generation import DecodingConfig
    from armodal.textgen import generate_text, stream_text

    app = FastAPI()
    add_playground_routes(app, run, Settings())

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": run.path.name, "object": "model",
                                            "modality": run.tokenizer.modality}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        temperature = body.get("temperature", 1.0)
        decoding = DecodingConfig(strategy="greedy" if temperature == 0 else "sample",
                                  temperature=temperature or 1.0, top_p=body.get("top_p"),
                                  top_k=body.get("top_k"), seed=body.get("seed"),
                                  max_new_tokens=body.get("max_tokens", 16))
        if not body.get("stream"):
            text = generate_text(run, [body["prompt"]], decoding)[0]["text"]
            return {"object": "text_completion", "choices": [{"index": 0, "text": text}]}

        def events():
            pieces = stream_text(run, body["prompt"], decoding)
            next(pieces)  # the prompt itself
            for piece in pieces:
                chunk = {"object": "text_completion",
                         "choices": [{"index": 0, "text": piece, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


class LiveServer:
    """uvicorn serving `app` on a free loopback port from a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                                    log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def post_json(url: str, body: dict) -> dict:
    import urllib.request

    request = urllib.request.Request(url, json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="the playwright python package is not installed")
    with sync_api.sync_playwright() as p:
        # The system Chromium: `playwright install` would download one, and CI may be offline.
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        yield browser
        browser.close()


def stream_in_page(browser, url: str, prompt: str, seed: int) -> str:
    """Type a prompt into the page, generate greedily, return the streamed output text."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(url + "/")
        page.wait_for_selector("#generate:enabled", timeout=15_000)
        page.fill("#prompt", prompt)
        page.fill("#max_tokens", "12")
        page.fill("#temperature", "0")
        page.fill("#seed", str(seed))
        page.click("#generate")
        page.wait_for_selector("#output[data-done='true']", timeout=30_000)
        assert not page.locator("#status.error").count(), page.inner_text("#status")
        assert not errors, errors
        return page.eval_on_selector("#output", "el => el.textContent")
    finally:
        page.close()


@pytest.mark.parametrize("server_app", ["real", "stub"])
def test_page_streams_what_completions_returns(browser, text_run, server_app):
    if server_app == "real":
        create_app = real_create_app()
        from armodal.serve.settings import ServerSettings

        app = create_app(text_run, ServerSettings(port=0))
    else:
        app = stub_text_app(text_run)
    with LiveServer(app) as server:
        streamed = stream_in_page(browser, server.url, "def f(x):", seed=3)
        whole = post_json(server.url + "/v1/completions",
                          {"model": text_run.path.name, "prompt": "def f(x):",
                           "max_tokens": 12, "temperature": 0, "seed": 3})["choices"][0]["text"]
    assert streamed and streamed == whole


def test_image_page_shows_the_generated_grid(browser, image_run):
    # No /v1/models here: the page falls back to /v1/playground/info for the modality.
    app = FastAPI()
    add_playground_routes(app, image_run, Settings())
    with LiveServer(app) as server:
        page = browser.new_page()
        try:
            page.goto(server.url + "/")
            page.wait_for_selector("#generate:enabled", timeout=15_000)
            assert page.is_visible("#classes") and not page.is_visible("#prompt")
            page.fill("#classes", "0, 2")
            page.fill("#images-n", "2")
            page.click("#generate")
            page.wait_for_function(
                "() => { const i = document.querySelector('#media-image');"
                " return i && i.complete && i.naturalWidth > 0; }", timeout=30_000)
            width = page.eval_on_selector("#media-image", "img => img.naturalWidth")
        finally:
            page.close()
    assert width == grid_size(2, 2, (4, 5))[0]


def test_audio_page_asks_for_the_key_then_plays_clips(browser, audio_run):
    app = FastAPI()
    add_playground_routes(app, audio_run, Settings(api_key="sekret"))
    with LiveServer(app) as server:
        page = browser.new_page()
        try:
            page.goto(server.url + "/")
            page.wait_for_selector("#status.error", timeout=15_000)  # 401 until the key is in
            assert page.is_disabled("#generate")
            page.fill("#api_key", "sekret")
            page.dispatch_event("#api_key", "change")
            page.wait_for_selector("#generate:enabled", timeout=15_000)
            assert page.is_visible("#seconds") and not page.is_visible("#prompt")
            page.fill("#seconds", "0.02")
            page.fill("#clips-n", "2")
            page.click("#generate")
            # Both clips decode: their length is known once the browser has parsed each WAV.
            page.wait_for_function(
                "() => { const a = [...document.querySelectorAll('audio.media-audio')];"
                " return a.length === 2 && a.every(x => x.readyState >= 1); }", timeout=30_000)
            durations = page.eval_on_selector_all("audio.media-audio",
                                                  "els => els.map(a => a.duration)")
        finally:
            page.close()
    assert durations == pytest.approx([0.02, 0.02], abs=1e-3)
