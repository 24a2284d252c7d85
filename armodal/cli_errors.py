"""How the CLI reports what a user got wrong: one line on stderr, exit status 2.

Hydra's and OmegaConf's messages span several lines (search paths, object types, a hint to set
HYDRA_FULL_ERROR); `one_line` keeps what names the key or option and what is allowed.
`--debug` (or HYDRA_FULL_ERROR=1) lets the exception through with its traceback instead.
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from collections.abc import Callable

from omegaconf import DictConfig

__all__ = ["UsageError", "debugging", "friendly_errors", "one_line", "suggest_key"]


class UsageError(Exception):
    """Bad command-line input; printed as one line, exit status 2."""


def debugging() -> bool:
    """`--debug` sets HYDRA_FULL_ERROR=1, which Hydra also reads for its own errors."""
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


class friendly_errors:
    """Turn the errors a user can cause into one line on stderr and exit status 2.
    `base_config` (composes the command's config without overrides) lets an unknown key's
    message suggest the nearest real key; it is only called for such a message."""

    def __init__(self, command: str, base_config: Callable[[], DictConfig] | None = None):
        self.command, self.base_config = command, base_config

    def __enter__(self) -> friendly_errors:
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        # Only a training run raises RunStopped, and it has imported armodal.resume; importing
        # it here for every command would load Lightning just to report a typo.
        resume = sys.modules.get("armodal.resume")
        if resume is not None and isinstance(error, resume.RunStopped):
            # a clean stop on SIGTERM / SIGINT, checkpoint saved
            print(f"armodal {self.command}: stopped on {error}", file=sys.stderr)
            sys.exit(error.exit_code)
        user_errors = (UsageError, ValueError, FileNotFoundError, HydraException,
                       OmegaConfBaseException)
        if isinstance(error, user_errors) and not debugging():
            print(f"armodal {self.command}: error: {one_line(error, self.base_config)}",
                  file=sys.stderr)
            sys.exit(2)
        return False


def one_line(error: BaseException,
             base_config: Callable[[], DictConfig] | None = None) -> str:
    """The message of `error` in one line, reworded where Hydra's is long or indirect."""
    text = str(error)
    cause = error.__cause__
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and cause is not None and "not in struct" in str(cause):
        key = unknown.group(1)
        inner = re.search(r"full_key: (\S+)", str(cause))
        if inner and inner.group(1).startswith(f"{key}."):
            # key exists and holds a dict; a {name: value} override merges into it, and struct
            # mode refuses the names it does not hold yet
            return (f"{key} holds no {inner.group(1)[len(key) + 1:]!r} yet; to add entries "
                    f"write ++{key}={{...}} or +{inner.group(1)}=...")
        hint = suggest_key(base_config(), key) if base_config is not None else None
        return (f"unknown config key {key!r}" + (f" (did you mean {hint}?)" if hint else "")
                + f"; to add a new key write +{key}=...")
    missing = re.search(r"Could not find '([^'/]+)/([^']+)'", text)
    if missing:
        options = re.findall(r"^\t(\S+)$", text, flags=re.MULTILINE)
        return (f"{missing.group(1)}={missing.group(2)}: no such option"
                + (f"; available: {', '.join(options)}" if options else ""))
    required = re.match(r"Missing mandatory value: ?(\S*)", text)
    if required:
        key = re.search(r"full_key: (\S+)", text)
        key = key.group(1) if key else required.group(1)
        return f"{key} is required (the config leaves it ???); pass {key}=..."
    called = re.match(r"Error in call to target '([^']+)'", text)
    if called and cause is not None:
        key = re.search(r"full_key: (\S+)", text)
        return f"{key.group(1) if key else called.group(1)}: {one_line(cause)}"
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not line.startswith(
        ("object_type=", "Config search path", "provider=", "Set the environment variable"))]
    return "; ".join(kept) if kept else type(error).__name__


def suggest_key(config: DictConfig, key: str) -> str | None:
    """The config's dotted key closest to `key` (a typo'd override), if one is close."""
    keys = [k for k in _dotted_keys(config) if not k.startswith("hydra.")]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return close[0] if close else None


def _dotted_keys(node, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(node, DictConfig):
        for name in node.keys():
            path = f"{prefix}{name}"
            keys.append(path)
            # _get_node: the child as stored, without resolving its interpolations
            keys += _dotted_keys(node._get_node(name), f"{path}.")
    return keys
