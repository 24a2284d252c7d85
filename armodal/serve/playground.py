"""The browser playground (`GET /`) and the image / audio endpoint (`POST /v1/media`).

The playground is one static HTML page with inline JS and CSS (no CDN: serving machines are
often offline). It asks `GET /v1/models` (or `GET /v1/playground/info`) which modality the run
has; text runs stream from `/v1/completions`, image and audio runs call `/v1/media`.

`POST /v1/media` takes JSON

    {"n": 1, "seed": null, "temperature": 1.0, "top_k": null, "top_p": null,
     "cfg_scale": 1.0, "classes": null, "seconds": null}

- image runs: a PNG grid, one row per requested class (`classes`: class ids; null = every
  trained class, or unconditional images for an unconditional run), `n` images per row.
- audio runs: `seconds` long clips (null = the run's clip length); n == 1 gives one audio/wav,
  n > 1 gives JSON {"object": "list", "sample_rate": ..., "data": [{"index", "b64_wav"}]}.

Generation blocks the calling thread, so it runs in the threadpool, one request at a time (a
lock), and never writes into the run directory.
"""

from __future__ import annotations

import base64
import hmac
import math
import tempfile
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, ValidationError
from starlette.concurrency import run_in_threadpool

from armodal.checkpoint import LoadedRun
from armodal.generation import DecodingConfig

__all__ = ["MAX_CLIPS", "MAX_IMAGES", "MAX_SECONDS", "MediaRequest", "add_playground_routes"]

PAGE = Path(__file__).parent / "static" / "playground.html"
MAX_IMAGES = 64  # images in one grid (n x classes)
MAX_CLIPS = 16  # audio clips per request
MAX_SECONDS = 10.0  # per clip: a CPU server decodes audio one sample or frame per step
MEDIA_MODALITIES = ("image", "audio")



class MediaRequest(BaseModel):
    """The body of POST /v1/media. Unknown keys are refused so a typo ("clases") is an error,
    not a silently ignored option; types are strict ("2" or true is a client bug, not a
    number; ints are taken where floats are)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None  # accepted for OpenAI-client symmetry; the server has one run
    n: StrictInt = 1
    seed: StrictInt | None = None
    temperature: StrictFloat = 1.0
    top_k: StrictInt | None = None
    top_p: StrictFloat | None = None
    cfg_scale: StrictFloat = 1.0
    classes: list[StrictInt] | None = None
    seconds: StrictFloat | None = None


class MediaError(Exception):
    """A request the endpoint refuses: becomes an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


def error_response(err: MediaError) -> JSONResponse:
    """OpenAI's error body (its type is invalid_request_error for a bad key too)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse({"error": {"message": err.message, "type": "invalid_request_error",
                                   "param": err.param, "code": err.code}},
                        status_code=err.status, headers=headers)


def add_playground_routes(app: FastAPI, run: LoadedRun, settings: Any) -> None:
    """Register `GET /`, `GET /v1/playground/info` and `POST /v1/media` on `app`.

    settings: the server's settings; `api_key` (if set) is required as a Bearer token on the
    /v1 routes here, and `model_name` (if set) names the model, else the run directory does.
    """
    page = PAGE.read_text(encoding="utf-8")  # read once: a missing file fails at startup
    modality = run.tokenizer.modality
    model_name = getattr(settings, "model_name", None) or run.path.name
    lock = threading.Lock()  # one generation at a time: the model is shared, CPUs are few

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/playground/info")
    def playground_info(request: Request) -> Response:
        try:
            check_api_key(request, settings)
        except MediaError as err:
            return error_response(err)
        return JSONResponse({"modality": modality, "model": model_name,
                             "limits": {"images": MAX_IMAGES, "clips": MAX_CLIPS,
                                        "seconds": MAX_SECONDS}, **media_defaults(run)})

    @app.post("/v1/media")
    async def media(request: Request) -> Response:
        try:
            check_api_key(request, settings)
            body = await parse_body(request)
            if modality not in MEDIA_MODALITIES:
                instead = "; use /v1/completions" if modality == "text" else ""
                raise MediaError(f"this server runs a {modality} model ({model_name}); "
                                 f"/v1/media serves image and audio runs{instead}",
                                 code="unsupported_modality")
            if body.model is not None and body.model != model_name:
                raise MediaError(f"model={body.model!r} is not served here; this server "
                                 f"serves {model_name!r}", "model", status=404,
                                 code="model_not_found")
            decoding = decoding_from(body)

            def work() -> Response:
                with lock:
                    return generate_media(run, body, decoding)

            return await run_in_threadpool(work)
        except MediaError as err:
            return error_response(err)


def check_api_key(request: Request, settings: Any) -> None:
    """Refuse a request without `Authorization: Bearer <settings.api_key>` when a key is set."""
    key = getattr(settings, "api_key", None)
    if not key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    # compare_digest: the time taken does not reveal how much of the key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                             str(key).encode()):
        raise MediaError("missing or wrong API key; send the header "
                         "'Authorization: Bearer <key>'", status=401, code="invalid_api_key")


async def parse_body(request: Request) -> MediaRequest:
    try:
        raw = await request.json()
    except ValueError:
        raise MediaError("the request body is not valid JSON; send a JSON object such as "
                         '{"n": 1, "seed": 0}', code="invalid_json") from None
    if not isinstance(raw, dict):
        raise MediaError(f"the request body is a JSON {type(raw).__name__}; send a JSON object",
                         code="invalid_json")
    try:
        return MediaRequest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])  # "classes.0": the bad list item
        allowed = ", ".join(MediaRequest.model_fields)
        detail = f"; allowed fields: {allowed}" if first["type"] == "extra_forbidden" else ""
        raise MediaError(f"{where}={first.get('input')!r}: {first['msg']}{detail}",
                         str(first["loc"][0]) if first["loc"] else None, status=422,
                         code="invalid_value") from None


def decoding_from(body: MediaRequest) -> DecodingConfig:
    """The request's sampling settings as a DecodingConfig (its checks name the bad value)."""
    try:
        return DecodingConfig(strategy="sample", temperature=body.temperature, top_k=body.top_k,
                              top_p=body.top_p, cfg_scale=body.cfg_scale, seed=body.seed)
    except ValueError as err:
        # DecodingConfig says "invalid DecodingConfig: <field>=<value>; expected ...".
        field = str(err).partition(": ")[2].partition("=")[0] or None
        raise MediaError(str(err), field if field in MediaRequest.model_fields else None,
                         code="invalid_value") from None


def media_defaults(run: LoadedRun) -> dict:
    """What the page shows before the user chooses: trained classes, the clip length."""
    if run.tokenizer.modality == "image":
        image = run.meta.get("image") or {}
        return {"classes": image.get("classes") if image.get("conditional") else None}
    if run.tokenizer.modality == "audio":
        return {"seconds": default_seconds(run), "sample_rate": run.tokenizer.sample_rate}
    return {}


def default_seconds(run: LoadedRun) -> float:
    return min(float((run.meta.get("audio") or {}).get("clip_seconds") or 1.0), MAX_SECONDS)


def generate_media(run: LoadedRun, body: MediaRequest, decoding: DecodingConfig) -> Response:
    """Blocking: sample, encode into memory (a temp dir at most), return the HTTP response."""
    try:
        if run.tokenizer.modality == "image":
            return image_response(run, body, decoding)
        return audio_response(run, body, decoding)
    except ValueError as err:  # the generators' own checks: bad class id, cfg on uncond run...
        raise MediaError(str(err), code="invalid_value") from None


def image_response(run: LoadedRun, body: MediaRequest, decoding: DecodingConfig) -> Response:
    from armodal.data.image_module import ImageLayout
    from armodal.imagegen import requested_labels, sample_images, save_grid

    if body.seconds is not None:
        raise MediaError(f"seconds={body.seconds} is for audio runs; this is an image run",
                         "seconds")
    layout = ImageLayout.for_run(run.space, run.meta)
    check_count(body.n, MAX_IMAGES, "n")
    try:
        labels = requested_labels(layout, body.classes, body.n)
    except ValueError as err:  # a class id outside the trained ones, classes on an uncond run
        raise MediaError(str(err), "classes", code="invalid_value") from None
    if not labels:
        raise MediaError("classes=[] asks for no images; give class ids or null for all",
                         "classes")
    if len(labels) > MAX_IMAGES:
        raise MediaError(f"n={body.n} images for each of {len(labels) // body.n} classes is "
                         f"{len(labels)} images; at most {MAX_IMAGES} per request (lower n or "
                         f"name fewer classes)", "n", code="too_many")
    images = sample_images(run.model, run.tokenizer, layout, labels, decoding)
    # One grid row per class; unconditional images wrap at 8 so the grid stays square-ish.
    per_row = body.n if layout.conditional else min(body.n, 8)
    with tempfile.TemporaryDirectory(prefix="armodal-media-") as tmp:
        png = save_grid(images, Path(tmp) / "grid.png", nrow=per_row).read_bytes()
    return Response(png, media_type="image/png",
                    headers={"X-Images": str(len(labels)), "X-Images-Per-Row": str(per_row)})


def audio_response(run: LoadedRun, body: MediaRequest, decoding: DecodingConfig) -> Response:
    from armodal.audiogen import sample_audio, save_wav
    from armodal.data.audio_module import AudioLayout

    if body.classes is not None:
        raise MediaError(f"classes={body.classes} is for image runs; this is an audio run",
                         "classes")
    if body.cfg_scale != 1.0:
        raise MediaError(f"cfg_scale={body.cfg_scale}: audio runs are unconditional; use 1",
                         "cfg_scale")
    check_count(body.n, MAX_CLIPS, "n")
    seconds = default_seconds(run) if body.seconds is None else float(body.seconds)
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_SECONDS):
        raise MediaError(f"seconds={body.seconds!r}; allowed: more than 0, at most "
                         f"{MAX_SECONDS:g}", "seconds", code="invalid_value")
    layout = AudioLayout.for_run(run.space, run.meta, run.tokenizer)
    rate = run.tokenizer.sample_rate
    waves = sample_audio(run.model, run.tokenizer, layout, body.n, seconds, decoding)
    with tempfile.TemporaryDirectory(prefix="armodal-media-") as tmp:
        clips = [save_wav(w, rate, Path(tmp) / f"clip_{i}.wav").read_bytes()
                 for i, w in enumerate(waves)]
    if len(clips) == 1:
        return Response(clips[0], media_type="audio/wav", headers={"X-Sample-Rate": str(rate)})
    return JSONResponse({"object": "list", "sample_rate": rate, "seconds": seconds,
                         "data": [{"index": i, "b64_wav": base64.b64encode(c).decode()}
                                  for i, c in enumerate(clips)]})


def check_count(n: int, most: int, name: str) -> None:
    if not 1 <= n <= most:
        raise MediaError(f"{name}={n}; allowed: 1 to {most}", name, code="invalid_value")
