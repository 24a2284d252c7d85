"""Rewards for sequence-level fine-tuning (armodal/reinforce.py): one number per sampled
continuation. A reward is any callable `(samples) -> list[float]`; a config names one with
`_target_`, so users plug in their own next to these.

PythonParses       1 when the prompt plus the continuation is valid Python (ast.parse), else 0.
RepetitionPenalty  minus the fraction of tokens that repeat an n-gram already in the sample.
"""

from __future__ import annotations

import ast
import warnings
from dataclasses import dataclass
from typing import Protocol

__all__ = ["PythonParses", "RepetitionPenalty", "Reward", "Sample", "repeated_ngram_fraction"]


@dataclass(frozen=True)
class Sample:
    """One sampled continuation, as a reward sees it."""

    prompt: str
    text: str  # the continuation only
    tokens: list[int]  # its token ids (stop token excluded)
    finished: bool  # ended on the stop token, not cut off by max_new_tokens


class Reward(Protocol):
    def __call__(self, samples: list[Sample]) -> list[float]: ...


class PythonParses:
    """1.0 when prompt + continuation parses as Python, else 0.0.

    A continuation cut off by max_new_tokens is judged on its whole lines (up to the last
    newline): a snippet is not penalised for where the length limit fell, only for what it
    wrote. A finished one (the model ended the document) is judged whole."""

    def __call__(self, samples: list[Sample]) -> list[float]:
        return [1.0 if parses(snippet(s)) else 0.0 for s in samples]


def snippet(sample: Sample) -> str:
    code = sample.prompt + sample.text
    if not sample.finished:
        code = code[:code.rfind("\n") + 1] if "\n" in sample.text else sample.prompt
    return code


def parses(code: str) -> bool:
    if not code.strip():
        return False  # an empty snippet is valid Python but no code at all
    try:
        with warnings.catch_warnings():  # invalid escape sequences etc. are not our concern
            warnings.simplefilter("ignore")
            ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: NUL bytes
        return False
    return True


class RepetitionPenalty:
    """-(fraction of the sample's tokens that complete an n-gram seen earlier in it): 0 for a
    sample without repeats, towards -1 for a loop."""

    def __init__(self, n: int = 4):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}; expected an n-gram length >= 1")
        self.n = n

    def __call__(self, samples: list[Sample]) -> list[float]:
        return [-repeated_ngram_fraction(s.tokens, self.n) for s in samples]


def repeated_ngram_fraction(tokens: list[int], n: int) -> float:
    """Of the len - n + 1 n-grams of `tokens`, the fraction that occurred earlier (0 when the
    sequence is shorter than n)."""
    seen, repeats = set(), 0
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams) if grams else 0.0
