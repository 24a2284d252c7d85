"""DecodingConfig: the one validated set of decoding settings.

The same config drives the CLI, the Python API and the server, and Hydra builds it from
`conf/decoding/*.yaml`, so every field is a plain type and every bad value is rejected here,
before any model runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from numbers import Integral, Real

__all__ = ["DecodingConfig", "STRATEGIES"]

STRATEGIES = ("greedy", "sample", "beam")
SPECULATIVE = ("draft", "prompt_lookup")
BEAM_LENGTHS = ("generated", "hf")


def _is_int(value: object) -> bool:
    # bool is an Integral, but `max_new_tokens=True` is always a mistake.
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _finite(value: object) -> bool:
    """A real number that is finite as a float (10**400 is not)."""
    try:
        return _is_real(value) and math.isfinite(value)
    except OverflowError:
        return False


@dataclass(frozen=True)
class DecodingConfig:
    """How to turn next-token distributions into sequences.

    Attributes:
        strategy: "greedy" (argmax), "sample" (draw from the processed distribution) or "beam"
            (beam search with num_beams beams).
        max_new_tokens: most tokens generated per row (>= 1).
        min_new_tokens: stop ids are suppressed until a row has this many new tokens
            (0 <= min_new_tokens <= max_new_tokens).
        temperature: logits are divided by it before sampling (>= 0; 0 means greedy).
        top_k: sample only among the k most likely tokens (>= 1), or None for no limit.
        top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches
            top_p (in (0, 1]), or None for no limit.
        min_p: drop tokens whose probability is below min_p * (the top token's probability);
            in [0, 1], 0 is a no-op; None for off.
        typical_p: locally typical sampling mass in (0, 1], or None for off.
        repetition_penalty: > 0; 1 is off. Logits of ids already in the sequence (prompt
            included) are divided by it when positive and multiplied when negative (CTRL / HF).
        presence_penalty: subtracted once from the logit of every id already generated.
        frequency_penalty: subtracted from each id's logit times its count among the
            generated tokens (OpenAI semantics; the prompt is not counted by either).
        no_repeat_ngram_size: > 0 forbids any n-gram of that size from occurring twice.
        banned_token_ids: ids that are never generated.
        allowed_token_ids: if set, only these ids (plus stop ids) can be generated.
        stop_token_ids: a row finishes when it produces one of these (the token is kept).
            Callers pass the TokenSpace's eos here. Lists are converted to a tuple.
        stop_sequences: multi-token stop sequences (tuples of ids); a row finishes when its
            new tokens end with one (kept in the output).
        stop_strings: a row finishes when its decoded text contains one; the text is cut
            before it, and streamed text is held back while a stop string is partly matched.
        num_return_sequences: outputs per prompt (independent samples, or the n best beams).
        seed: seeds a per-request torch.Generator; the same request gives the same output
            whatever else is in the batch. None uses the global RNG.
        num_beams: beams for strategy "beam" (>= 1; 1 is greedy).
        length_penalty: beam score = sum logprob / length ** length_penalty.
        early_stopping: beam search stop rule, as in Hugging Face: True stops once
            num_beams finished hypotheses exist; False stops when no beam can still beat
            the worst kept one (estimated at the current length); "never" checks against
            the best score reachable by max length.
        beam_length: how length is counted in the length penalty: "generated" (new tokens
            only) or "hf" (Hugging Face's convention, for parity).
        top_logprobs: also report the top-n alternatives (id, logprob) at each step (>= 0).
        cfg_scale: classifier-free guidance scale; 1 is off (requires unconditional prompts).
        use_cache: decode with the KV cache (prefill once, then one token per step); without it
            the whole sequence is re-run each step, the slow reference path.
        compile: run each single-token decode step as a torch.compile'd graph over the static
            cache (compiled once per batch shape and cache length, never per step).
        speculative: None (plain decoding), "draft" (a smaller draft model sharing the
            TokenSpace proposes tokens; pass it as generate(..., draft=)) or "prompt_lookup"
            (proposals copied from an earlier occurrence of the last n-gram; no draft model).
            The output distribution is exactly the target model's.
        num_draft_tokens: tokens proposed per speculative step (gamma, >= 1); with
            adaptive_draft it is the starting value.
        adaptive_draft: grow gamma by two after a step where every proposal of every row was
            accepted, else shrink it by one (within [1, 2 * num_draft_tokens]).
        draft_confidence: a row stops drafting after a proposal the draft model gave a
            probability below this ([0, 1]; 0 always drafts gamma tokens).
        prompt_lookup_max_ngram: longest n-gram prompt lookup matches (>= 1); shorter ones
            are tried when it does not occur earlier.
        attention_sinks: None (off), or decode with a bounded sink cache (StreamingLLM): the
            first attention_sinks positions (>= 0) are kept forever beside a ring of the most
            recent cache_window ones, so any model decodes past max_seq_len in bounded
            memory. Greedy or sampling, cached and eager only.
        cache_window: the ring's size with attention_sinks (>= 1); None: the most the model
            allows, max_seq_len - attention_sinks (capped by a sliding window).
    """

    strategy: str = "sample"
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int = 0
    banned_token_ids: tuple[int, ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_sequences: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_return_sequences: int = 1
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    beam_length: str = "generated"
    top_logprobs: int = 0
    cfg_scale: float = 1.0
    use_cache: bool = True
    compile: bool = False
    speculative: str | None = None
    num_draft_tokens: int = 4
    adaptive_draft: bool = True
    draft_confidence: float = 0.0
    prompt_lookup_max_ngram: int = 3
    attention_sinks: int | None = None
    cache_window: int | None = None

    def __post_init__(self) -> None:
        # Hydra hands over ListConfig / list; tuples keep the frozen config hashable.
        object.__setattr__(self, "stop_token_ids", _ids("stop_token_ids", self.stop_token_ids))
        object.__setattr__(self, "banned_token_ids",
                           _ids("banned_token_ids", self.banned_token_ids))
        if self.allowed_token_ids is not None:
            allowed = _ids("allowed_token_ids", self.allowed_token_ids)
            if not allowed:
                _fail("allowed_token_ids", self.allowed_token_ids, "a non-empty list, or None")
            object.__setattr__(self, "allowed_token_ids", allowed)
        sequences = self.stop_sequences
        if isinstance(sequences, (str, bytes)) or not isinstance(sequences, Iterable):
            _fail("stop_sequences", sequences, "a list of non-empty lists of token ids")
        sequences = tuple(_ids("stop_sequences", seq) for seq in sequences)
        if any(not seq for seq in sequences):
            _fail("stop_sequences", self.stop_sequences, "a list of non-empty lists of token ids")
        object.__setattr__(self, "stop_sequences", sequences)
        strings = self.stop_strings
        if isinstance(strings, str) or not isinstance(strings, Iterable) or \
                not all(isinstance(x, str) and x for x in strings):
            _fail("stop_strings", strings, "a list of non-empty strings")
        object.__setattr__(self, "stop_strings", tuple(strings))

        if self.strategy not in STRATEGIES:
            _fail("strategy", self.strategy, f"one of {STRATEGIES}")
        _check_int("max_new_tokens", self.max_new_tokens, 1)
        if not (_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens):
            _fail("min_new_tokens", self.min_new_tokens,
                  f"an int in [0, max_new_tokens={self.max_new_tokens}]")
        if not (_is_real(self.temperature) and self.temperature >= 0):
            _fail("temperature", self.temperature, "a number >= 0 (0 means greedy)")
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1, "or None")
        _check_unit("top_p", self.top_p, "(0, 1]", low_open=True)
        _check_unit("min_p", self.min_p, "[0, 1]", low_open=False)
        _check_unit("typical_p", self.typical_p, "(0, 1]", low_open=True)
        if not (_is_real(self.repetition_penalty) and self.repetition_penalty > 0):
            _fail("repetition_penalty", self.repetition_penalty, "a number > 0 (1 is off)")
        for name in ("presence_penalty", "frequency_penalty", "length_penalty"):
            value = getattr(self, name)
            if not _finite(value):
                _fail(name, value, "a finite number")
        _check_int("no_repeat_ngram_size", self.no_repeat_ngram_size, 0)
        _check_int("num_return_sequences", self.num_return_sequences, 1)
        if self.seed is not None and not _is_int(self.seed):
            _fail("seed", self.seed, "an int or None")
        _check_int("num_beams", self.num_beams, 1)
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            _fail("early_stopping", self.early_stopping, "true, false or 'never'")
        if self.beam_length not in BEAM_LENGTHS:
            _fail("beam_length", self.beam_length, f"one of {BEAM_LENGTHS}")
        _check_int("top_logprobs", self.top_logprobs, 0)
        if not _finite(self.cfg_scale):
            _fail("cfg_scale", self.cfg_scale, "a finite number (1 is off)")
        for name in ("use_cache", "compile", "adaptive_draft"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "a bool")
        if self.compile and not self.use_cache:
            _fail("compile", self.compile, "false when use_cache=false (the compiled step "
                  "decodes over the KV cache)")
        self._check_speculative_options()
        self._check_beam_options()
        self._check_sink_options()

    def _check_speculative_options(self) -> None:
        _check_int("num_draft_tokens", self.num_draft_tokens, 1)
        _check_int("prompt_lookup_max_ngram", self.prompt_lookup_max_ngram, 1)
        if not (_is_real(self.draft_confidence) and 0 <= self.draft_confidence <= 1):
            _fail("draft_confidence", self.draft_confidence, "a number in [0, 1]")
        if self.speculative is None:
            return
        if self.speculative not in SPECULATIVE:
            _fail("speculative", self.speculative, f"None or one of {SPECULATIVE}")
        mode = f"with speculative={self.speculative!r}"
        if self.strategy == "beam":
            _fail("strategy", self.strategy, f"greedy or sample {mode}")
        if self.cfg_scale != 1.0:
            _fail("cfg_scale", self.cfg_scale, f"1 (no guidance) {mode}")
        if not self.use_cache:
            _fail("use_cache", self.use_cache, f"true {mode}")

    def _check_beam_options(self) -> None:
        if self.strategy != "beam":
            if self.num_beams != 1:
                _fail("num_beams", self.num_beams, "1 unless strategy='beam'")
            return
        # Beam search is deterministic: sampling filters would silently do nothing.
        sampling = {"temperature": (self.temperature, 1.0), "top_k": (self.top_k, None),
                    "top_p": (self.top_p, None), "min_p": (self.min_p, None),
                    "typical_p": (self.typical_p, None)}
        for name, (value, off) in sampling.items():
            if value != off:
                _fail(name, value, f"{off} with strategy='beam' (a sampling option; beam "
                      "search does not sample)")
        if self.compile:
            _fail("compile", self.compile, "false with strategy='beam' (beam search runs "
                  "eagerly; the compiled step serves greedy and sampling)")
        if self.num_return_sequences > self.num_beams:
            _fail("num_return_sequences", self.num_return_sequences,
                  f"at most num_beams={self.num_beams} with strategy='beam'")
        if self.stop_strings:
            _fail("stop_strings", self.stop_strings, "empty with strategy='beam' (use "
                  "stop_token_ids or stop_sequences)")

    def _check_sink_options(self) -> None:
        if self.cache_window is not None:
            _check_int("cache_window", self.cache_window, 1, "or None")
            if self.attention_sinks is None:
                _fail("cache_window", self.cache_window, "None unless attention_sinks is set")
        if self.attention_sinks is None:
            return
        _check_int("attention_sinks", self.attention_sinks, 0, "or None")
        # The sink cache is a ring: no beam reordering in place, no speculative rollback, no
        # static-cache graph, and the uncached path has no cache to bound.
        refusals = [(self.strategy == "beam", f"strategy={self.strategy!r}"),
                    (self.speculative is not None, f"speculative={self.speculative!r}"),
                    (self.compile, "compile=True"), (not self.use_cache, "use_cache=False")]
        for refused, what in refusals:
            if refused:
                _fail("attention_sinks", self.attention_sinks,
                      f"None with {what} (the sink cache serves cached, eager greedy or "
                      "sampling decoding)")

    @property
    def uses_history(self) -> bool:
        """True when a penalty reads the ids so far (repetition, presence, frequency, n-gram)."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0 or \
            self.frequency_penalty != 0 or self.no_repeat_ngram_size > 0

    @property
    def is_greedy(self) -> bool:
        """True when tokens are chosen by argmax: strategy "greedy" or temperature 0."""
        return self.strategy == "greedy" or self.temperature == 0


def _ids(field: str, value: object) -> tuple[int, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        _fail(field, value, "a list of non-negative int token ids")
    ids = tuple(value)
    if not all(_is_int(i) and i >= 0 for i in ids):
        _fail(field, value, "a list of non-negative int token ids")
    return tuple(int(i) for i in ids)


def _check_int(field: str, value: object, low: int, extra: str = "") -> None:
    if not (_is_int(value) and value >= low):
        _fail(field, value, f"an int >= {low}" + (f" {extra}" if extra else ""))


def _check_unit(field: str, value: object, interval: str, low_open: bool) -> None:
    if value is None:
        return
    ok = _is_real(value) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        _fail(field, value, f"a number in {interval} or None")


def _fail(field: str, value: object, allowed: str) -> None:
    raise ValueError(f"invalid DecodingConfig: {field}={value!r}; expected {allowed}")
