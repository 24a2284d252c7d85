"""ServerSettings: the operational limits of `armodal serve`, validated once at start-up.

conf/serve.yaml holds the defaults; the CLI builds one ServerSettings from it and hands it to
the app factory, the engine and the playground routes alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["ServerSettings"]


@dataclass(frozen=True)
class ServerSettings:
    """How the server binds and what it accepts.

    Attributes:
        host: interface to bind; 127.0.0.1 (loopback only) unless the operator opens it.
        port: TCP port (0 picks a free one, for tests).
        api_key: when set, every /v1/* request needs `Authorization: Bearer <api_key>`.
        max_queue: requests waiting for a batch slot before new ones get 429 + Retry-After.
        max_batch: sequences (output rows) decoded together in one step.
        max_prompt_tokens: longest prompt accepted, in tokens (bos included).
        max_tokens_limit: the largest max_tokens a request may ask for.
        request_timeout_s: a request still unfinished after this long is cancelled (408 if
            nothing was sent yet; a streamed one ends with finish_reason "timeout").
        model_name: the id /v1/models reports and requests may name (None: the run's folder
            name).
        device: where the model runs (cpu, cuda, ...).
        shutdown_grace_s: on SIGINT / SIGTERM, how long running requests may still finish
            before they are cancelled.
        threads: torch intra-op threads (None: torch's default, one per core).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_queue: int = 64
    max_batch: int = 32
    max_prompt_tokens: int = 1024
    max_tokens_limit: int = 512
    request_timeout_s: float = 120.0
    model_name: str | None = None
    device: str = "cpu"
    shutdown_grace_s: float = 10.0
    threads: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            _fail("host", self.host, "a non-empty interface address such as 127.0.0.1")
        if not (_is_int(self.port) and 0 <= self.port <= 65535):
            _fail("port", self.port, "an int in [0, 65535]")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            _fail("api_key", self.api_key, "a non-empty string, or null for no key")
        for name in ("max_queue", "max_batch", "max_prompt_tokens", "max_tokens_limit"):
            value = getattr(self, name)
            if not (_is_int(value) and value >= 1):
                _fail(name, value, "an int >= 1")
        timeout = self.request_timeout_s
        if not (_is_number(timeout) and timeout > 0):
            _fail("request_timeout_s", timeout, "a number of seconds > 0")
        if not (_is_number(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            _fail("shutdown_grace_s", self.shutdown_grace_s, "a number of seconds >= 0")
        if self.threads is not None and not (_is_int(self.threads) and self.threads >= 1):
            _fail("threads", self.threads, "an int >= 1, or null for torch's default")
        if not isinstance(self.device, str) or not self.device:
            _fail("device", self.device, "a torch device name such as cpu or cuda")
        if self.model_name is not None and (not isinstance(self.model_name, str)
                                            or not self.model_name):
            _fail("model_name", self.model_name, "a non-empty string, or null")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value)


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"invalid server setting {field}={value!r}; expected {allowed}")
