"""DecodingConfig: the one validated set of decoding settings.

The same config drives the CLI, the Python API and the server, and Hydra builds it from
`conf/decoding/*.yaml`, so every field is a plain type and every bad value is rejected here,
before any model runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real

__all__ = ["DecodingConfig", "STRATEGIES"]

STRATEGIES = ("greedy", "sample")


def _is_int(value: object) -> bool:
    # bool is an Integral, but `max_new_tokens=True` is always a mistake.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class DecodingConfig:
    """How to turn next-token distributions into sequences.

    Attributes:
        strategy: "greedy" (argmax) or "sample" (draw from the processed distribution).
        max_new_tokens: most tokens generated per row (>= 1).
        min_new_tokens: stop ids are suppressed until a row has this many new tokens
            (0 <= min_new_tokens <= max_new_tokens).
        temperature: logits are divided by it before sampling (>= 0; 0 means greedy).
        top_k: sample only among the k most likely tokens (>= 1), or None for no limit.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches
            top_p (in (0, 1]), or None for no limit.
        seed: seeds a per-call torch.Generator for sampling; None uses the global RNG.
        stop_token_ids: a row finishes when it produces one of these (the token is kept).
            Callers pass the TokenSpace's eos here. Lists are converted to a tuple.
        use_cache: decode with the KV cache (prefill once, then one token per step); without it
            the whole sequence is re-run each step, the slow reference path.
    """

    strategy: str = "sample"
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    use_cache: bool = True

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig / list; a tuple keeps the frozen config hashable.
        stop = self.stop_token_ids
        if isinstance(stop, (str, bytes)) or not isinstance(stop, Iterable):
            _fail("stop_token_ids", stop, "a list or tuple of non-negative int token ids")
        ids = tuple(stop)
        if not all(_is_int(i) and i >= 0 for i in ids):
            _fail("stop_token_ids", stop, "a list or tuple of non-negative int token ids")
        object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))

        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, f"one of {STRATEGIES}")
        if not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 1):
            _fail("max_new_tokens", self.max_new_tokens, "an int >= 1")
        if not (_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens):
            _fail("min_new_tokens", self.min_new_tokens,
                  f"an int in [0, max_new_tokens={self.max_new_tokens}]")
        if not (_is_real(self.temperature) and self.temperature >= 0):
            _fail("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            _fail("top_k", self.top_k, "an int >= 1 or None")
        if self.top_p is not None and not (_is_real(self.top_p) and 0 < self.top_p <= 1):
            _fail("top_p", self.top_p, "a number in (0, 1] or None")
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", self.seed, "an int or None")
        if not isinstance(self.use_cache, bool):
            _fail("use_cache", self.use_cache, "a bool")

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax: strategy "greedy" or temperature 0."""
        return self.strategy == "greedy" or self.temperature == 0


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"invalid DecodingConfig: {field}={value!r}; expected {allowed}")
