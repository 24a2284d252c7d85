"""How much long generations repeat themselves: pure functions over token id sequences.

- distinct-n (Li et al. 2016): unique n-grams / n-grams, a diversity measure;
- rep-n, "seq-rep-n" of Welleck et al. 2019 (unlikelihood training): the fraction of a
  sequence's n-grams that already occurred earlier in it, i.e. 1 - its own distinct-n;
- the trailing loop: the longest suffix that is one block of tokens repeated, the way a
  degenerate greedy decode ends ("the the the", or a sentence over and over).

An n-gram never spans two sequences. Where a measure has nothing to count (a sequence shorter
than n, or empty) it is None, not 0: a two-token answer is not "perfectly diverse".
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["distinct_n", "repetition_rate", "repeated_suffix_loop", "repetition_report",
           "format_report"]


def distinct_n(seq: Sequence[int], n: int) -> float | None:
    """Unique n-grams / n-grams of `seq`; None when it has no n-gram (len < n)."""
    grams = _ngrams(seq, n)
    return len(set(grams)) / len(grams) if grams else None


def repetition_rate(seq: Sequence[int], n: int = 4) -> float | None:
    """The fraction of tokens completing an n-gram already seen earlier in `seq`, out of the
    tokens that complete an n-gram at all (position >= n - 1): Welleck et al.'s seq-rep-n,
    1 - distinct_n(seq, n). None when seq has no n-gram."""
    grams = _ngrams(seq, n)
    if not grams:
        return None
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for gram in grams:
        repeats += gram in seen
        seen.add(gram)
    return repeats / len(grams)


def repeated_suffix_loop(seq: Sequence[int]) -> tuple[int, int]:
    """(period, span) of the longest trailing loop: the last `span` tokens are a block of
    `period` tokens that occurs at least twice in a row (the last copy may be cut short), and
    no other period covers more of the end (ties: the shortest period). (0, 0) when the
    sequence does not end in a repeat. [5, 1, 2, 3, 1, 2, 3, 1] -> (3, 7)."""
    ids = [int(i) for i in seq]
    # Read backwards, the end repeats with period p for z[p] + p tokens, where z[p] is the
    # common prefix of the reversed sequence and itself shifted by p (Z-function, O(len)).
    z = _z_function(ids[::-1])
    best = (0, 0)
    for period in range(1, len(ids) // 2 + 1):
        span = z[period] + period
        if z[period] >= period and span > best[1]:
            best = (period, span)
    return best


def repetition_report(sequences: Sequence[Sequence[int]], max_n: int = 4,
                      rep_n: int = 4) -> dict:
    """Per sequence and for all of them: tokens, distinct-1..max_n, rep-<rep_n>, and the
    trailing loop (loop_period, loop_span). In "all", distinct-n pools the n-grams of every
    sequence (Li et al.'s corpus measure: low when samples repeat each other too), rep-n is
    the mean over sequences that have an n-gram (as Welleck et al. average it), and the loop
    is the longest one."""
    _check_n("max_n", max_n)
    _check_n("rep_n", rep_n)
    rows = []
    for seq in sequences:
        period, span = repeated_suffix_loop(seq)
        row = {"tokens": len(seq)}
        row.update({f"distinct_{n}": distinct_n(seq, n) for n in range(1, max_n + 1)})
        row.update({f"rep_{rep_n}": repetition_rate(seq, rep_n), "loop_period": period,
                    "loop_span": span})
        rows.append(row)
    reps = [r[f"rep_{rep_n}"] for r in rows if r[f"rep_{rep_n}"] is not None]
    longest = max(rows, key=lambda r: r["loop_span"], default={"loop_period": 0,
                                                               "loop_span": 0})
    pooled = {"tokens": sum(r["tokens"] for r in rows)}
    for n in range(1, max_n + 1):
        grams = [g for seq in sequences for g in _ngrams(seq, n)]
        pooled[f"distinct_{n}"] = len(set(grams)) / len(grams) if grams else None
    pooled.update({f"rep_{rep_n}": sum(reps) / len(reps) if reps else None,
                   "loop_period": longest["loop_period"], "loop_span": longest["loop_span"]})
    return {"sequences": rows, "all": pooled}


def format_report(report: dict) -> str:
    """repetition_report's dict as a text table: one row per sequence, then "all"."""
    columns = list(report["all"])
    rows = [(str(i), r) for i, r in enumerate(report["sequences"])] + [("all", report["all"])]
    table = [["seq", *(c.replace("_", "-") for c in columns)]]
    table += [[name, *(_cell(row[c]) for c in columns)] for name, row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(line, widths)).rstrip()
                     for line in table)


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _ngrams(seq: Sequence[int], n: int) -> list[tuple[int, ...]]:
    _check_n("n", n)
    ids = [int(i) for i in seq]  # tensors and numpy arrays too: their items hash by value
    return [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]


def _check_n(name: str, n: object) -> None:
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ValueError(f"{name}={n!r}; expected an int >= 1 (the n-gram length)")


def _z_function(s: list[int]) -> list[int]:
    """z[i]: length of the longest common prefix of s and s[i:] (z[0] = len(s))."""
    n = len(s)
    z = [0] * n
    if n:
        z[0] = n
    left = right = 0  # [left, right): the rightmost match window found so far
    for i in range(1, n):
        if i < right:
            z[i] = min(right - i, z[i - left])
        while i + z[i] < n and s[z[i]] == s[i + z[i]]:
            z[i] += 1
        if i + z[i] > right:
            left, right = i, i + z[i]
    return z
