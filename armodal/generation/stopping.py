"""Per-row stop criteria: stop token ids, multi-token stop sequences and stop strings.

`StopChecker` is fed each row's new tokens one at a time and says when a row must stop and
why. For stop strings it also owns the row's text: the final text is cut before the stop
string, and `stream_text` hands out only text that can no longer turn out to be part of one.
Hitting max_new_tokens ("length") is the generate loop's business, not this module's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from armodal.generation.config import DecodingConfig

__all__ = ["StopChecker", "Decode"]

Decode = Callable[[list[int]], str]

# What a byte-level decoder shows for an incomplete UTF-8 character at the end of the text.
REPLACEMENT = "\ufffd"


@dataclass
class _Row:
    tokens: list[int] = field(default_factory=list)
    reason: str | None = None
    text: str | None = None  # decoded new tokens (cut once a stop string is found); None: stale
    released: int = 0  # characters of text already handed out by stream_text


class StopChecker:
    """Decides, token by token, when each row stops; rows are any ints (e.g. prompt indices).

    Args:
        config: supplies stop_token_ids, stop_sequences and stop_strings.
        decode: turns a row's new token ids into text; required for stop_strings, text() and
            stream_text(). The whole new-token list is decoded every time, because a later
            token can change how earlier ones decode (BPE merges, split UTF-8 characters).

    Reasons, checked in this order when several hold at the same token:
        "stop_token": the token is one of stop_token_ids (it stays in the output);
        "stop_sequence": the row's new tokens end with one of stop_sequences (kept);
        "stop_string": the decoded text contains one of stop_strings. The tokens are kept,
            but text() is cut before the earliest stop string, whatever the reason.
    """

    def __init__(self, config: DecodingConfig, decode: Decode | None = None) -> None:
        if config.stop_strings and decode is None:
            raise ValueError(f"stop_strings={config.stop_strings} need a `decode` function "
                             "(token ids -> text) to be checked")
        self._stop_ids = frozenset(config.stop_token_ids)
        self._sequences = [list(seq) for seq in config.stop_sequences]
        self._strings = config.stop_strings
        self._decode = decode
        self._rows: dict[int, _Row] = {}

    def update(self, row: int, token: int) -> str | None:
        """Record `token` as row's next new token; return the finish reason, or None.

        Raises ValueError if the row has already finished: its later tokens are not its own.
        """
        state = self._rows.setdefault(row, _Row())
        if state.reason is not None:
            raise ValueError(f"row {row} already finished ({state.reason!r}); it takes no more "
                             "tokens (use reset(row) to reuse the slot)")
        token = int(token)
        state.tokens.append(token)
        state.text = None
        reason = None
        if token in self._stop_ids:
            reason = "stop_token"
        elif any(state.tokens[-len(seq):] == seq for seq in self._sequences):
            # A plain suffix test also catches overlaps such as [5, 5, 6] in 5, 5, 5, 6.
            reason = "stop_sequence"
        if self._strings:
            text = self._decode(state.tokens)
            cut = _first_stop(text, self._strings)
            state.text = text if cut is None else text[:cut]
            if cut is not None and reason is None:
                reason = "stop_string"
        state.reason = reason
        return reason

    def finish(self, row: int, reason: str) -> None:
        """Mark a running row finished for a reason decided outside (e.g. "length"), so that
        stream_text releases its held-back tail. A row that already stopped keeps its reason.
        """
        state = self._rows.setdefault(row, _Row())
        if state.reason is None:
            state.reason = reason

    def reason(self, row: int) -> str | None:
        """The row's finish reason, or None while it is still running (or unseen)."""
        state = self._rows.get(row)
        return None if state is None else state.reason

    def tokens(self, row: int) -> list[int]:
        """The row's new tokens so far (stop token / sequence / string tokens included)."""
        state = self._rows.get(row)
        return [] if state is None else list(state.tokens)

    def text(self, row: int) -> str:
        """The row's decoded new tokens, cut before the earliest stop string if one occurred.

        For a running row this is everything decoded so far, held-back text included.
        """
        return self._text(self._rows.setdefault(row, _Row()))

    def stream_text(self, row: int, final: bool = False) -> str:
        """The row's newly safe text since the last call ("" if none, or without `decode`).

        While the row runs, a suffix that is a proper prefix of some stop string is held back
        until it completes one (then it is never released) or diverges (then it is), and so
        is a trailing U+FFFD (an incomplete UTF-8 character that the next token may fix).
        Once the row has finished (update() returned a reason, finish() was called, or
        `final` is True, e.g. on the last step for "length"), the rest of text() is released.
        So the pieces, joined, equal text() at the end and never contain a stop string,
        provided the decoder only rewrites a trailing U+FFFD (byte-level decoding) and not
        earlier text.
        """
        if self._decode is None:
            return ""
        state = self._rows.setdefault(row, _Row())
        text = self._text(state)
        done = final or state.reason is not None
        end = len(text) if done else _safe_end(text, self._strings)
        piece = text[state.released:end]
        state.released = max(state.released, end)
        return piece

    def reset(self, row: int) -> None:
        """Forget the row, so its slot can take a new request."""
        self._rows.pop(row, None)

    def _text(self, state: _Row) -> str:
        if self._decode is None:
            raise ValueError("StopChecker was built without a `decode` function; text() and "
                             "stream_text() need one")
        if state.text is None:
            state.text = self._decode(list(state.tokens))
        return state.text


def _first_stop(text: str, strings: tuple[str, ...]) -> int | None:
    """Index of the earliest occurrence of any of `strings` in text, or None."""
    found = [i for i in (text.find(s) for s in strings) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, strings: tuple[str, ...]) -> int:
    """How much of a running row's text can be released: all but the held-back tail.

    A trailing run of U+FFFD is held (the next token may complete the character), and before
    it the longest suffix that is a proper prefix of a stop string (the longest, so no stop
    string can start before the cut, whatever the held characters turn into).
    """
    settled = text.rstrip(REPLACEMENT)
    hold = 0
    for s in strings:
        for k in range(min(len(s) - 1, len(settled)), hold, -1):
            if settled.endswith(s[:k]):
                hold = k
                break
    return len(settled) - hold
