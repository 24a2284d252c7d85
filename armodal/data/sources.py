"""Raw text sources: where documents come from before tokenization.

A source lists its files lazily (at `documents()` / `fingerprint()` time, not at construction) so
that Hydra configs naming data that is not on this machine still compose and instantiate.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

# One selected file: (absolute path, name relative to the source root, bytes to read).
_Entry = tuple[Path, str, int]


@runtime_checkable
class DocumentSource(Protocol):
    """Anything that yields named text documents and a cheap identity for cache keys."""

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (name, text) pairs in a deterministic order."""
        ...

    def fingerprint(self) -> str:
        """A hex digest that changes when the documents or the selection settings change."""
        ...


def _select(
    files: list[Path], root: Path, max_files: int | None, max_bytes: int | None
) -> list[_Entry]:
    """Keep non-empty files in order, capped by count and by total bytes (last one truncated)."""
    entries: list[_Entry] = []
    total = 0
    for f in files:
        if max_files is not None and len(entries) >= max_files:
            break
        size = f.stat().st_size
        if size == 0:
            continue
        if max_bytes is not None:
            size = min(size, max_bytes - total)
            if size <= 0:
                break
        entries.append((f, f.relative_to(root).as_posix(), size))
        total += size
    return entries


def _read(entries: list[_Entry]) -> Iterator[tuple[str, str]]:
    for path, name, size in entries:
        with open(path, "rb") as fh:
            data = fh.read(size)
        # errors="replace": a corpus with a stray bad byte (or a max_bytes cut inside a
        # multi-byte character) should still train, not crash.
        yield name, data.decode("utf-8", errors="replace")


def fingerprint_files(entries: list[_Entry], settings: dict) -> str:
    """sha256 over the settings and each entry's (name, size, mtime); reads no content."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path, name, size in sorted(entries, key=lambda e: e[1]):
        h.update(f"\0{name}\0{size}\0{path.stat().st_mtime_ns}".encode())
    return h.hexdigest()


def _check_limits(max_files: int | None, max_bytes: int | None) -> None:
    if max_files is not None and max_files < 1:
        raise ValueError(f"max_files must be >= 1 or None, got {max_files}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1 or None, got {max_bytes}")


class TextSource:
    """Text files as documents: one file, a folder (recursive `pattern` match) or a glob.

    Files are sorted by path so the document order, and hence the tokens, are deterministic.
    Empty files are skipped. `max_bytes` caps the total read; the last file is cut to fit.
    Names are relative to the folder, the file's parent, or the glob's literal leading directory.
    """

    def __init__(
        self,
        path: str,
        pattern: str = "**/*",
        max_files: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        _check_limits(max_files, max_bytes)
        self.path = path
        self.pattern = pattern
        self.max_files = max_files
        self.max_bytes = max_bytes

    def _entries(self) -> list[_Entry]:
        path = os.path.expanduser(self.path)
        if any(c in path for c in "*?["):
            files = sorted(Path(p) for p in glob.glob(path, recursive=True) if os.path.isfile(p))
            # Names are relative to the glob's literal prefix, so they do not depend on cwd.
            prefix = path[: min(path.find(c) for c in "*?[" if c in path)]
            root = Path(os.path.dirname(prefix) or ".")
            what = f"glob {path!r}"
        elif os.path.isfile(path):
            files, root, what = [Path(path)], Path(path).parent, f"file {path!r}"
        elif os.path.isdir(path):
            root = Path(path)
            files = sorted(p for p in root.glob(self.pattern) if p.is_file())
            what = f"folder {path!r} with pattern {self.pattern!r}"
        else:
            raise FileNotFoundError(
                f"TextSource path {path!r} does not exist; expected a file, a folder "
                f"(files matching pattern={self.pattern!r} below it) or a glob with * or ?"
            )
        entries = _select(files, root, self.max_files, self.max_bytes)
        if not entries:
            raise ValueError(
                f"empty corpus: {what} matched {len(files)} file(s), none with any content"
            )
        return entries

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (relative name, text) for every selected file."""
        return _read(self._entries())

    def fingerprint(self) -> str:
        """sha256 over sorted (name, size, mtime_ns) and the settings; reads no content."""
        settings = {
            "class": "TextSource",
            "path": os.path.abspath(os.path.expanduser(self.path)),
            "pattern": self.pattern,
            "max_files": self.max_files,
            "max_bytes": self.max_bytes,
        }
        return fingerprint_files(self._entries(), settings)

    def __repr__(self) -> str:
        return f"TextSource(path={self.path!r}, pattern={self.pattern!r})"


class StdlibSource:
    """The Python standard library's own `.py` files: a real code corpus on every machine.

    Skips site-packages and, unless `include_tests`, the test suites (`test/`, `tests/`,
    `idlelib/idle_test/`), which are large and repetitive.
    """

    _TEST_DIRS = {"test", "tests", "idle_test"}
    _SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}

    def __init__(
        self,
        max_files: int | None = None,
        max_bytes: int | None = None,
        include_tests: bool = False,
    ) -> None:
        _check_limits(max_files, max_bytes)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.include_tests = include_tests
        self.root = Path(sysconfig.get_paths()["stdlib"])

    def _entries(self) -> list[_Entry]:
        skip = self._SKIP_DIRS | (set() if self.include_tests else self._TEST_DIRS)
        files = []
        # os.walk with pruning, not rglob: skipping site-packages and caches keeps this cheap.
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = [d for d in dirnames if d not in skip]
            files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
        files.sort(key=lambda p: p.relative_to(self.root).as_posix())
        files = [p for p in files if p.is_file()]
        entries = _select(files, self.root, self.max_files, self.max_bytes)
        if not entries:
            raise ValueError(f"empty corpus: no .py files found under stdlib {self.root}")
        return entries

    def documents(self) -> Iterator[tuple[str, str]]:
        """Yield (path relative to the stdlib root, source text) per module."""
        return _read(self._entries())

    def fingerprint(self) -> str:
        """sha256 over sorted (name, size, mtime_ns) and the settings; reads no content."""
        settings = {
            "class": "StdlibSource",
            "max_files": self.max_files,
            "max_bytes": self.max_bytes,
            "include_tests": self.include_tests,
        }
        return fingerprint_files(self._entries(), settings)

    def __repr__(self) -> str:
        return f"StdlibSource(max_files={self.max_files}, include_tests={self.include_tests})"
