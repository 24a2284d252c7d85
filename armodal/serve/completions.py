"""POST /v1/completions: a validated request -> engine requests -> OpenAI response or SSE stream.

One engine request per prompt; choice index = prompt index * n + sample index, as OpenAI
numbers them. Engine events arrive on the engine thread and are handed to the event loop
through an asyncio.Queue; a client that goes away cancels its engine requests, which frees
their batch rows at the next step boundary.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from starlette.requests import Request

from armodal.checkpoint import LoadedRun
from armodal.serve.api import ApiError, CompletionRequest, decoding_config, error_body
from armodal.serve.engine import (
    Engine,
    EngineClosed,
    Finished,
    GenerationRequest,
    QueueFull,
    TokenOut,
)
from armodal.serve.settings import ServerSettings
from armodal.textgen import decode_text, encode_prompt

__all__ = ["Plan", "plan_completion", "Submission", "complete", "stream_chunks"]

# Engine endings that are not a finished completion, as (HTTP status, type, code).
_FAILURES = {"timeout": (408, "timeout_error", "request_timeout"),
             "error": (500, "server_error", "engine_error"),
             "shutdown": (503, "server_error", "shutting_down"),
             "cancelled": (499, "server_error", "cancelled")}


@dataclass
class Plan:
    """One completion call: its engine requests and what the response needs."""

    id: str
    model: str
    request: CompletionRequest
    prompt_texts: list[str]
    generation: list[GenerationRequest]
    decode_one: Callable[[int], str]
    created: int = field(default_factory=lambda: int(time.time()))
    # The request's log line; t0 (its arrival) is what time to first token counts from.
    log: dict = field(default_factory=lambda: {"t0": time.monotonic()})

    @property
    def n(self) -> int:
        return self.request.n or 1


def plan_completion(request: CompletionRequest, run: LoadedRun, settings: ServerSettings,
                    engine: Engine, model_name: str) -> Plan:
    """Check the request against the server's limits and the run; ApiError when it fails."""
    if request.model != model_name:
        raise ApiError(404, f"the model {request.model!r} does not exist; this server serves "
                            f"{model_name!r} (GET /v1/models)", param="model",
                       code="model_not_found")
    if run.tokenizer.modality != "text":
        raise ApiError(400, f"{model_name} is a {run.tokenizer.modality} run; /v1/completions "
                            f"serves text runs (POST /v1/media generates images and sounds)",
                       param="model", code="unsupported_model")
    n, max_tokens = request.n or 1, request.max_tokens or 16
    if max_tokens > settings.max_tokens_limit:
        raise ApiError(400, f"max_tokens={max_tokens} is over this server's limit of "
                            f"{settings.max_tokens_limit}", param="max_tokens",
                       code="invalid_value")
    prompts = request.prompts()
    if n > settings.max_batch or len(prompts) > settings.max_batch:
        raise ApiError(400, f"{len(prompts)} prompt(s) x n={n}: this server takes at most "
                            f"{settings.max_batch} prompts and n <= {settings.max_batch} per "
                            f"request", param="n" if n > settings.max_batch else "prompt",
                       code="invalid_value")
    vocab = run.space.vocab_size
    config = decoding_config(request, run.space.eos_id)
    decode = lambda tokens: decode_text(run.tokenizer, run.space, tokens)  # noqa: E731
    generation, texts = [], []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            try:
                ids, text = encode_prompt(run.tokenizer, run.space, prompt), prompt
            except (ValueError, TypeError) as err:  # e.g. a lone surrogate: not text
                raise ApiError(400, f"prompt {i} cannot be tokenized: {err}", param="prompt",
                               code="invalid_value") from None
        else:
            bad = [t for t in prompt if not 0 <= t < vocab]
            if bad:
                raise ApiError(400, f"prompt {i} has token ids {bad[:5]} outside the "
                                    f"vocabulary [0, {vocab})", param="prompt",
                               code="invalid_value")
            ids, text = list(prompt), decode(list(prompt))
        if len(ids) > settings.max_prompt_tokens:
            raise ApiError(400, f"prompt {i} is {len(ids)} tokens long; this server takes at "
                                f"most {settings.max_prompt_tokens}", param="prompt",
                           code="context_length_exceeded")
        gen = GenerationRequest(ids, config, decode, settings.request_timeout_s)
        try:
            engine.check(gen)
        except ValueError as err:
            raise ApiError(400, str(err).replace("max_new_tokens", "max_tokens"),
                           param="max_tokens", code="context_length_exceeded") from None
        generation.append(gen)
        texts.append(text)
    return Plan(f"cmpl-{uuid.uuid4().hex[:24]}", model_name, request, texts, generation,
                lambda token: decode([token]))


class Submission:
    """A plan's engine requests, submitted together; their events, in order, on the loop."""

    def __init__(self, engine: Engine, plan: Plan):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tickets = []

        def sink(i: int):
            return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
        try:
            for i, gen in enumerate(plan.generation):
                self.tickets.append(engine.submit(gen, sink(i)))
        except QueueFull as err:
            self.cancel()
            raise ApiError(429, f"the server is busy: {err}", type="rate_limit_error",
                           code="queue_full",
                           headers={"Retry-After": str(err.retry_after_s)}) from None
        except EngineClosed as err:
            self.cancel()
            raise ApiError(503, str(err), type="server_error", code="shutting_down") from None

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()

    async def events(self) -> AsyncIterator[tuple[int, TokenOut | Finished]]:
        """(prompt index, event) until every engine request has sent its Finished."""
        left = len(self.tickets)
        while left:
            i, event = await self.queue.get()
            left -= isinstance(event, Finished)
            yield i, event


def _failure(finished: Finished) -> ApiError:
    status, kind, code = _FAILURES[finished.reason]
    message = finished.message or {
        "timeout": "the request did not finish within the server's request timeout",
        "cancelled": "the request was cancelled"}.get(finished.reason, finished.reason)
    return ApiError(status, message, type=kind, code=code)


def _finish_reason(reason: str | None) -> str | None:
    return None if reason is None else ("length" if reason == "length" else "stop")


class _Logprobs:
    """OpenAI's legacy logprobs object of one choice, built token by token."""

    def __init__(self, plan: Plan, offset: int):
        self.plan, self.offset = plan, offset
        self.tokens, self.token_logprobs, self.top, self.offsets = [], [], [], []

    def add(self, event: TokenOut) -> dict:
        """Record the event's token; returns the one-token piece a stream chunk carries."""
        text = self.plan.decode_one(event.token)
        top = {self.plan.decode_one(t): lp for t, lp in event.top_logprobs or ()}
        piece = {"tokens": [text], "token_logprobs": [event.logprob],
                 "top_logprobs": [top] if event.top_logprobs is not None else None,
                 "text_offset": [self.offset]}
        self.tokens.append(text)
        self.token_logprobs.append(event.logprob)
        self.top.append(top)
        self.offsets.append(self.offset)
        self.offset += len(text)
        return piece

    def whole(self) -> dict:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top if self.plan.request.logprobs else None,
                "text_offset": self.offsets}


async def complete(plan: Plan, submission: Submission, request: Request) -> dict:
    """Wait for every row; the OpenAI text_completion object. A client that disconnects
    meanwhile cancels the engine requests (ApiError 499, never sent)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, submission))
    n, want_logprobs = plan.n, plan.request.logprobs is not None
    logprobs: dict[int, _Logprobs] = {}
    reasons: dict[int, str] = {}
    texts: dict[int, str] = {}
    tokens = 0
    try:
        async for i, event in submission.events():
            if isinstance(event, TokenOut):
                index = i * n + event.row
                tokens += 1
                plan.log.setdefault("ttft_s", time.monotonic() - plan.log["t0"])
                if want_logprobs:
                    logprobs.setdefault(index, _Logprobs(plan, len(plan.prompt_texts[i])))
                    logprobs[index].add(event)
                if event.finish_reason is not None:
                    reasons[index] = event.finish_reason
            elif event.reason != "done":
                submission.cancel()
                raise _failure(event)
            else:
                texts.update({i * n + k: text for k, text in enumerate(event.texts)})
    finally:
        watcher.cancel()
        submission.cancel()  # a no-op once done; frees the rows if this task was cancelled
    choices = [{"index": j, "text": texts[j],
                "logprobs": logprobs[j].whole() if j in logprobs else None,
                "finish_reason": _finish_reason(reasons.get(j))} for j in sorted(texts)]
    usage = _usage(plan, tokens)
    plan.log.update(completion_tokens=tokens, finish_reasons=[c["finish_reason"]
                                                              for c in choices])
    return {"id": plan.id, "object": "text_completion", "created": plan.created,
            "model": plan.model, "choices": choices, "usage": usage}


async def stream_chunks(plan: Plan, submission: Submission) -> AsyncIterator[str]:
    """Server-sent events: one chunk per token, then `data: [DONE]`; an engine failure ends
    the stream with an error object instead (the openai client raises it)."""
    n, want_logprobs = plan.n, plan.request.logprobs is not None
    logprobs: dict[int, _Logprobs] = {}
    tokens, failed = 0, False
    try:
        async for i, event in submission.events():
            if isinstance(event, Finished):
                if event.reason != "done":
                    failed = True
                    error = _failure(event)
                    plan.log.update(status=error.status, error=error.message)
                    yield _sse(error_body(error.message, error.type, None, error.code))
                    break
                continue
            index = i * n + event.row
            tokens += 1
            plan.log.setdefault("ttft_s", time.monotonic() - plan.log["t0"])
            piece = None
            if want_logprobs:
                piece = logprobs.setdefault(index, _Logprobs(plan, len(plan.prompt_texts[i])))
                piece = piece.add(event)
            choice = {"index": index, "text": event.text, "logprobs": piece,
                      "finish_reason": _finish_reason(event.finish_reason)}
            yield _sse({"id": plan.id, "object": "text_completion", "created": plan.created,
                        "model": plan.model, "choices": [choice]})
        if not failed:
            options = plan.request.stream_options
            if options is not None and options.include_usage:
                yield _sse({"id": plan.id, "object": "text_completion",
                            "created": plan.created, "model": plan.model, "choices": [],
                            "usage": _usage(plan, tokens)})
            yield "data: [DONE]\n\n"
    finally:
        # Also reached when the client disconnects (the response task is cancelled).
        submission.cancel()
        plan.log.update(completion_tokens=tokens)


def _usage(plan: Plan, completion_tokens: int) -> dict:
    prompt_tokens = sum(len(g.prompt) for g in plan.generation)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _cancel_on_disconnect(request: Request, submission: Submission) -> None:
    """Wait for the client to leave (the body has been read, so the next ASGI message is the
    disconnect), then cancel its engine requests."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            submission.cancel()
            return
