"""One row per benchmark case: printed as it completes, as a table, and as `figure` lines."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass


@dataclass
class Row:
    """A case's armodal figure next to its peer's, measured in the same run.

    ratio is always armodal / peer: above 1 is better for rates, below 1 for times and memory.
    `missing` says why a case could not run ("n/a (reason)"); then the figures are None.
    """

    name: str  # figure name, e.g. "120m_greedy_b8"
    case: str  # table label, e.g. "greedy b8"
    unit: str
    ours: float | None
    peer_name: str
    peer: float | None
    note: str = ""
    missing: str | None = None

    @property
    def ratio(self) -> float | None:
        if self.ours is None or self.peer is None or self.peer == 0:
            return None
        return self.ours / self.peer

    def figure_line(self) -> str:
        if self.missing:
            return f"figure {self.name}: n/a ({self.missing})"
        line = f"figure {self.name}: {_num(self.ours)} {self.unit}"
        if self.peer is not None:
            line += f" | peer {self.peer_name} {_num(self.peer)} {self.unit} | ratio " \
                    f"{_num(self.ratio)}"
        return line


def missing(name: str, case: str, unit: str, peer_name: str, reason: str) -> Row:
    return Row(name, case, unit, None, peer_name, None, missing=reason)


def _num(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}" if abs(x) >= 0.001 else f"{x:.3g}"


_COLUMNS = ("case", "unit", "armodal", "peer", "peer value", "ratio", "note")


def _cells(row: Row) -> tuple[str, ...]:
    if row.missing:
        return (row.case, row.unit, "n/a", row.peer_name, "", "", f"n/a ({row.missing})")
    peer = _num(row.peer) if row.peer is not None else ""
    ratio = _num(row.ratio) if row.ratio is not None else ""
    return (row.case, row.unit, _num(row.ours), row.peer_name, peer, ratio, row.note)


def print_row(row: Row) -> None:
    """One line as soon as the case completes, so a long run shows progress."""
    print("row  " + "  ".join(f"{k}={v}" for k, v in zip(_COLUMNS, _cells(row)) if v),
          flush=True)


def print_table(title: str, rows: list[Row], out=sys.stdout) -> None:
    cells = [_COLUMNS] + [_cells(r) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS) - 1)]
    print(f"\n{title}", file=out)
    for i, c in enumerate(cells):
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)) + "  " + c[-1], file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 4, file=out)
    out.flush()


@dataclass(frozen=True)
class Target:
    """A goal on a figure's ratio, e.g. armodal greedy b1 >= 2x transformers."""

    case: str  # figure name without the size prefix
    op: str  # ">=", ">" or "<="
    threshold: float
    sizes: tuple[str, ...] | None = None  # None: every size that ran

    def met(self, ratio: float) -> bool:
        return {">=": ratio >= self.threshold, ">": ratio > self.threshold,
                "<=": ratio <= self.threshold}[self.op]


def check_targets(targets: list[Target], rows: dict[str, list[Row]]) -> list[str]:
    """One line per target and size: the measured ratio and PASS / FAIL, or why it is n/a."""
    lines = []
    for size, size_rows in rows.items():
        by_name = {row.name: row for row in size_rows}
        for target in targets:
            if target.sizes is not None and size not in target.sizes:
                continue
            name = f"{size}_{target.case}"
            row = by_name.get(name)
            want = f"want {target.op} {target.threshold:g}"
            if row is None or row.ratio is None:
                reason = "not run" if row is None else (row.missing or "no peer figure")
                lines.append(f"target {name}: n/a ({reason}); {want}")
                continue
            verdict = "PASS" if target.met(row.ratio) else "FAIL"
            lines.append(f"target {name}: ratio {_num(row.ratio)} vs {row.peer_name}, {want}: "
                         f"{verdict}")
    return lines
