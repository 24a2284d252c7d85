"""The OpenAI completions request, its validation, and its mapping onto DecodingConfig.

Every bad request becomes an ApiError, which the app sends as OpenAI's error body
{"error": {"message", "type", "param", "code"}} with a 4xx status. Validation is strict:
unknown fields, wrong JSON types ("5" for an int, 1.5 for n) and out-of-range values are
refused with a message that names the field, the value and what is allowed.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from armodal.generation import DecodingConfig

__all__ = ["ApiError", "CompletionRequest", "StreamOptions", "parse_completion",
           "decoding_config", "error_body"]

_INT64 = 2**63


class ApiError(Exception):
    """An error the client caused (4xx) or the server reports (5xx), in OpenAI's format."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    # strict: JSON types are taken as sent (no "5" -> 5, no 2.0 -> 2, no true -> 1); an int
    # is still a valid float. NaN and infinity are refused everywhere.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class CompletionRequest(_Strict):
    """POST /v1/completions: OpenAI's fields, then armodal's extra decoding fields.

    `null` means the default for every optional field. Token-id prompts are global ids of the
    run's TokenSpace, used as given (no bos is added); text prompts get bos prepended.
    """

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(1.0, gt=0, le=1)
    n: int | None = Field(1, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool | None = False
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    best_of: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=-_INT64, lt=_INT64)
    user: str | None = None
    suffix: str | None = None
    # armodal's extra decoding fields (DecodingConfig), with the same meaning and ranges
    top_k: int | None = Field(None, ge=1)
    min_p: float | None = Field(None, ge=0, le=1)
    typical_p: float | None = Field(None, gt=0, le=1)
    repetition_penalty: float | None = Field(1.0, gt=0, le=10)
    min_tokens: int | None = Field(0, ge=0)
    no_repeat_ngram_size: int | None = Field(0, ge=0)
    ignore_eos: bool | None = False

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt(s) as a list: strings, or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


_ALLOWED = {
    "prompt": "a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "a string, a list of up to 4 strings, or null",
    "stream_options": 'an object such as {"include_usage": true}, or null',
    "logit_bias": "an object of token id -> bias, or null",
}


def parse_completion(raw: bytes) -> CompletionRequest:
    """The request body -> a validated CompletionRequest, or ApiError 400 naming the field."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON ({err}); send a JSON object "
                            f"with Content-Type: application/json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body is a JSON {type(body).__name__}; expected a JSON "
                            f"object of completion parameters")
    try:
        request = CompletionRequest.model_validate(body)
    except ValidationError as err:
        raise _validation_error(err, body) from None
    _check_supported(request)
    return request


def _validation_error(err: ValidationError, body: dict) -> ApiError:
    first = err.errors()[0]
    param = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    if first["type"] == "missing":
        return ApiError(400, f"missing required argument: {param}", param=param,
                        code="missing_required_parameter")
    value = _short(body.get(param)) if param in body else _short(first.get("input"))
    allowed = _ALLOWED.get(param) or first["msg"][0].lower() + first["msg"][1:]
    return ApiError(400, f"invalid value for {param}: {value}; expected {allowed}",
                    param=param, code="invalid_value")


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) \
        else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_supported(request: CompletionRequest) -> None:
    """Refuse, by name, the OpenAI fields whose behaviour armodal does not provide."""
    if request.echo:
        raise ApiError(400, "echo=true is not supported; the completion never repeats the "
                            "prompt", param="echo", code="unsupported_parameter")
    if request.suffix:
        raise ApiError(400, "suffix is not supported (armodal models complete left to right)",
                       param="suffix", code="unsupported_parameter")
    if request.best_of is not None and request.best_of != (request.n or 1):
        raise ApiError(400, f"best_of={request.best_of} is not supported; leave it unset or "
                            f"equal to n", param="best_of", code="unsupported_parameter")
    if request.logit_bias:
        raise ApiError(400, "logit_bias is not supported; armodal's banned tokens and penalties "
                            "are repetition_penalty, presence_penalty and frequency_penalty",
                       param="logit_bias", code="unsupported_parameter")
    stops = request.stops()
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, f"invalid value for stop: {_short(request.stop)}; expected "
                            f"{_ALLOWED['stop']} (non-empty)", param="stop", code="invalid_value")
    prompts = request.prompts()
    if not prompts or any(len(p) == 0 and not isinstance(p, str) for p in prompts):
        raise ApiError(400, "prompt is empty; give a string or a non-empty list",
                       param="prompt", code="invalid_value")


def decoding_config(request: CompletionRequest, eos_id: int) -> DecodingConfig:
    """The DecodingConfig a request decodes with (the run's eos stops a row unless
    ignore_eos). temperature 0 is greedy; top_p 1 is no nucleus filter."""
    fields = dict(
        max_new_tokens=request.max_tokens or 16,
        min_new_tokens=request.min_tokens or 0,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_k=request.top_k, min_p=request.min_p, typical_p=request.typical_p,
        top_p=None if request.top_p in (None, 1) else request.top_p,
        repetition_penalty=1.0 if request.repetition_penalty is None
        else request.repetition_penalty,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        no_repeat_ngram_size=request.no_repeat_ngram_size or 0,
        stop_token_ids=() if request.ignore_eos else (eos_id,),
        stop_strings=request.stops(), num_return_sequences=request.n or 1,
        seed=request.seed, top_logprobs=request.logprobs or 0)
    try:
        return DecodingConfig(**fields)
    except ValueError as err:  # a combination the ranges above cannot see
        field = str(err).split("=", 1)[0].rsplit(" ", 1)[-1]
        param = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                 "num_return_sequences": "n", "stop_strings": "stop"}.get(field, field)
        message = str(err).replace("invalid DecodingConfig: ", "")
        for name, api in (("min_new_tokens", "min_tokens"), ("max_new_tokens", "max_tokens")):
            message = message.replace(name, api)
        raise ApiError(400, f"invalid value: {message}", param=param,
                       code="invalid_value") from None
