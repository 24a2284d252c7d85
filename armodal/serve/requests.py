"""What the engine takes and sends: a GenerationRequest in; TokenOut events, then one Finished.

check_request holds the engine's contract (what it can decode), so the server can refuse a
request with a 400 before it ever queues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from armodal.generation import DecodingConfig
from armodal.generation.checks import check_ids_in_vocab
from armodal.generation.stopping import Decode

__all__ = ["GenerationRequest", "TokenOut", "Finished", "Event", "QueueFull", "EngineClosed",
           "EngineStats", "check_request"]


class QueueFull(Exception):
    """The waiting queue is at its bound; retry after `retry_after_s`."""

    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the queue holds {waiting} waiting requests, its limit; retry in "
                         f"{retry_after_s} s")
        self.retry_after_s = retry_after_s


class EngineClosed(Exception):
    """The engine is shutting down and takes no new requests."""


@dataclass
class GenerationRequest:
    """One prompt to complete: config.num_return_sequences rows, seeded by config.seed.

    decode turns new-token ids into text (needed for stop_strings, and for TokenOut.text);
    timeout_s counts from submission, queueing included.
    """

    prompt: list[int]
    config: DecodingConfig
    decode: Decode | None = None
    timeout_s: float | None = None


@dataclass
class TokenOut:
    """One produced token of row `row` (which of the request's samples)."""

    row: int
    token: int
    logprob: float
    text: str  # newly releasable text ("" without decode; held back near stop strings)
    finish_reason: str | None  # set on the row's last token: stop_token, stop_string, length...
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Finished:
    """A request's last event. reason: "done" (every row finished), "cancelled", "timeout",
    "shutdown" or "error" (message says why); texts: each row's final text with decode."""

    reason: str
    message: str = ""
    texts: list[str] | None = None


Event = TokenOut | Finished


@dataclass
class EngineStats:
    """Counters for /health and the logs."""

    steps: int = 0
    tokens: int = 0
    requests: int = 0
    running_rows: int = 0
    waiting: int = 0
    started: float = field(default_factory=time.monotonic)


def check_request(request: GenerationRequest, vocab: int, max_rows: int, context: int) -> None:
    """ValueError, naming the value, if an engine of `max_rows` rows over a model of `vocab`
    ids and `context` positions cannot serve `request`."""
    c = request.config
    refused = [(c.strategy == "beam", f"strategy={c.strategy!r}"),
               (c.speculative is not None, f"speculative={c.speculative!r}"),
               (c.cfg_scale != 1.0, f"cfg_scale={c.cfg_scale}"),
               (c.attention_sinks is not None, f"attention_sinks={c.attention_sinks}"),
               (c.compile, "compile=True"), (not c.use_cache, "use_cache=False")]
    for bad, what in refused:
        if bad:
            raise ValueError(f"{what}: the engine serves cached greedy and sampling rows "
                             f"only (no beam, speculative, guidance, sinks or compile)")
    if not request.prompt or not all(isinstance(i, int) and 0 <= i < vocab
                                     for i in request.prompt):
        raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab})")
    if c.num_return_sequences > max_rows:
        raise ValueError(f"n={c.num_return_sequences} rows exceed the batch of {max_rows}")
    if c.stop_strings and request.decode is None:
        raise ValueError(f"stop_strings={c.stop_strings} need a decode function")
    check_ids_in_vocab(c, vocab)
    if len(request.prompt) + c.max_new_tokens > context:
        raise ValueError(f"prompt of {len(request.prompt)} tokens + max_new_tokens="
                         f"{c.max_new_tokens} exceeds the model's context of {context} tokens")
