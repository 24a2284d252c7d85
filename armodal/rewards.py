"""Rewards for sequence-level fine-tuning (armodal/reinforce.py): one number per sampled
continuation. A reward is any callable `(samples) -> list[float]`; a config names one with
`_target_`, so users plug in their own next to these.

PythonParses       1 when the prompt plus the continuation is valid Python (ast.parse), else 0.
RepetitionPenalty  minus the fraction of tokens that repeat an n-gram already in the sample.
"""

from __future__ import annotations

import ast
import io
import tokenize
import warnings
from dataclasses import dataclass
from typing import Protocol

from armodal.generation.repetition import repetition_rate

__all__ = ["PythonParses", "RepetitionPenalty", "Reward", "Sample"]


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
    wrote. A finished one (the model ended the document) is judged whole.

    The snippet must also begin with the prompt's own Python tokens: without that check a
    model tuned on prompt "def" learns to write "def_name" plus a comment, which parses (a
    bare name) but is no function at all (found in the first tuning run)."""

    def __call__(self, samples: list[Sample]) -> list[float]:
        return [1.0 if parses(code := snippet(s)) and keeps_prompt(s.prompt, code) else 0.0
                for s in samples]


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


def keeps_prompt(prompt: str, code: str) -> bool:
    """Whether `code` (which parses) starts with the Python tokens of `prompt`, e.g. prompt
    "def" -> NAME 'def' first, not 'def_name'."""
    wanted = python_tokens(prompt)
    if not wanted:  # no prompt, or one that does not tokenize on its own (an open string)
        return True
    return python_tokens(code, len(wanted)) == wanted


def python_tokens(code: str, limit: int | None = None) -> list[str] | None:
    """The first `limit` significant token strings of `code` (no comments, newlines,
    indentation), or None when it does not tokenize."""
    found = []
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENCODING, tokenize.ENDMARKER}
    try:
        for token in tokenize.generate_tokens(io.StringIO(code).readline):
            if token.type not in skip:
                found.append(token.string)
                if limit is not None and len(found) == limit:
                    break
    except (tokenize.TokenError, SyntaxError):
        return None if limit is None else found
    return found


class RepetitionPenalty:
    """-(fraction of the sample's tokens that complete an n-gram seen earlier in it): 0 for a
    sample without repeats, towards -1 for a loop."""

    def __init__(self, n: int = 4):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n={n!r}; expected an n-gram length >= 1")
        self.n = n

    def __call__(self, samples: list[Sample]) -> list[float]:
        # A sample too short to hold an n-gram repeats nothing.
        return [-(repetition_rate(s.tokens, self.n) or 0.0) for s in samples]
