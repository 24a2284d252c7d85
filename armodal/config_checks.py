"""Checks on a composed training config, run before any data is read or model is built.

A bad value is refused at once, in one line that names its key, the value and what is allowed,
instead of minutes later (after a tokenizer fit) as a library's error that names neither.
Only keys the config has are checked, so one function serves the LM, codec and audio codec
configs. Checks that need several keys (d_model divisible by n_head, ...) are the config
classes' own: ModelConfig, DecodingConfig and ScheduledSampling are built here from the
config, which is cheap.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = ["ConfigError", "check_train_config"]

_ABSENT = object()


class ConfigError(ValueError):
    """A config value that is not allowed; the message starts with its key."""


def check_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value in `cfg` that training would refuse or misuse."""
    for key, check in _CHECKS:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT:
            continue
        allowed = check(value)
        if allowed is not None:
            raise ConfigError(f"{key}={value!r}: {allowed}")
    if OmegaConf.select(cfg, "model._target_") == "armodal.model.ModelConfig":
        _build(cfg, "model", vocab_size=2)  # vocab_size comes from the data; any value will do
    if OmegaConf.select(cfg, "decoding._target_", default=None) is not None:
        _build(cfg, "decoding")
    scheduled = OmegaConf.select(cfg, "scheduled_sampling", default=None)
    if scheduled is not None:
        from armodal.lit import ScheduledSampling  # its checks name scheduled_sampling.<key>

        try:
            ScheduledSampling(**OmegaConf.to_container(scheduled, resolve=True))
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from error


def _build(cfg: DictConfig, key: str, **kwargs: Any) -> None:
    """Instantiate cfg[key] to run its class's own checks; its refusal is named by `key`."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        instantiate(cfg[key], **kwargs)
    except InstantiationException as error:
        cause = error.__cause__ if error.__cause__ is not None else error
        raise ConfigError(f"{key}: {cause}") from error


# Each check returns None when the value is fine, else what is allowed.
Check = Callable[[Any], "str | None"]


def integer(low: int | None = None, high: int | None = None, none: bool = False) -> Check:
    def check(value: Any) -> str | None:
        if value is None and none:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) \
            and (low is None or value >= low) and (high is None or value <= high)
        if ok:
            return None
        bounds = " and ".join(part for part in (
            f">= {low}" if low is not None else "", f"<= {high}" if high is not None else "")
            if part)
        return f"expected an integer{' ' + bounds if bounds else ''}" + (" or null" if none else "")
    return check


def number(low: float, high: float = math.inf, low_open: bool = False,
           high_open: bool = False, none: bool = False) -> Check:
    """A finite real number in the interval low..high (open or closed at either end)."""
    def check(value: Any) -> str | None:
        if value is None and none:
            return None
        if isinstance(value, (int, float)) and not isinstance(value, bool) \
                and math.isfinite(value) \
                and (value > low if low_open else value >= low) \
                and (value < high if high_open else value <= high):
            return None
        if high == math.inf:
            interval = f"{'>' if low_open else '>='} {low}"
        else:
            interval = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        return f"expected a finite number {interval}" + (" or null" if none else "")
    return check


def choice(*options: Any) -> Check:
    def check(value: Any) -> str | None:
        if any(value == o and type(value) is type(o) for o in options):
            return None
        return f"expected one of {', '.join(repr(o) for o in options)}"
    return check


def boolean(value: Any) -> str | None:
    return None if isinstance(value, bool) else "expected true or false"


def either(*checks: Check, allowed: str) -> Check:
    def check(value: Any) -> str | None:
        return None if any(c(value) is None for c in checks) else f"expected {allowed}"
    return check


def betas(value: Any) -> str | None:
    pair = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
    if isinstance(pair, (list, tuple)) and len(pair) == 2 \
            and all(number(0, 1, high_open=True)(b) is None for b in pair):
        return None
    return "expected two numbers in [0, 1), e.g. [0.9, 0.95]"


def _precisions() -> tuple:
    from lightning.fabric.connector import _PRECISION_INPUT

    return tuple(v for literal in typing.get_args(_PRECISION_INPUT)
                 for v in typing.get_args(literal))


def precision(value: Any) -> str | None:
    return None if value in _precisions() else \
        f"expected one of {', '.join(repr(p) for p in _precisions())}"


def resume(value: Any) -> str | None:
    if value is None or value == "auto" or (isinstance(value, str) and Path(value).is_file()):
        return None
    return ("expected auto (with run_dir=<the run's dir>), null, or a checkpoint file such as "
            "<run dir>/checkpoints/last.ckpt")


_CHECKS: list[tuple[str, Check]] = [
    ("task", choice("codec", "audio_codec", "sequence_tuning", "episode_tuning",
                    "prefix_captioning")),
    ("seed", integer(0, 2**32 - 1)),  # Lightning's seed_everything bounds
    ("resume", resume),
    ("compile", boolean),
    ("nonfinite", choice("skip", "stop")),
    ("checkpoint_every", integer(1)),
    ("sample_every_validation", boolean),
    ("model.n_layer", integer(1)),
    ("model.n_head", integer(1)),
    ("model.n_kv_head", integer(1, none=True)),
    ("model.d_model", integer(2)),
    ("model.d_ff", integer(1, none=True)),
    ("model.rope_theta", number(0, low_open=True)),
    ("model.rope_scaling", choice(None, "linear", "ntk", "yarn")),
    ("model.rope_factor", number(1)),
    ("model.rope_original_len", integer(1, none=True)),
    ("model.dropout", number(0, 1, high_open=True)),
    ("model.tie_embeddings", boolean),
    ("model.sliding_window", integer(1, none=True)),
    ("optim.optimizer.lr", number(0, low_open=True)),
    ("optim.optimizer.weight_decay", number(0)),
    ("optim.optimizer.betas", betas),
    ("optim.optimizer.eps", number(0, low_open=True)),
    ("optim.scheduler.warmup_steps", integer(0)),
    ("optim.scheduler.min_lr_ratio", number(0, 1)),
    ("trainer.accelerator", choice("cpu", "gpu", "cuda", "mps", "tpu", "auto")),
    ("trainer.precision", precision),
    ("trainer.max_steps", either(integer(1), choice(-1), allowed="an integer >= 1, or -1")),
    ("trainer.val_check_interval", either(
        integer(1, none=True), number(0, 1, low_open=True),
        allowed="an integer >= 1 (steps), a fraction of an epoch in (0, 1], or null")),
    ("trainer.limit_val_batches", either(
        integer(0), number(0, 1, low_open=True),
        allowed="an integer >= 0 (batches) or a fraction of the val set in (0, 1]")),
    ("trainer.log_every_n_steps", integer(1)),
    ("trainer.gradient_clip_val", number(0, none=True)),
    ("trainer.accumulate_grad_batches", integer(1)),
    ("domain.data.seq_len", integer(1, none=True)),  # null: from the data (a whole clip)
    ("domain.data.batch_size", integer(1)),
    ("domain.data.val_fraction", number(0, 1, low_open=True, high_open=True)),
    ("domain.data.val_batches", integer(1, none=True)),
    ("domain.data.num_workers", integer(0)),
    ("data.batch_size", integer(1)),  # the codec configs' data block
    ("data.val_fraction", number(0, 1, low_open=True, high_open=True)),
    ("data.num_workers", integer(0)),
    ("samples_per_prompt", integer(2)),  # sequence-level fine-tuning (armodal/reinforce.py)
    ("prompts_per_step", integer(1)),
    ("max_new_tokens", integer(1)),
    ("temperature", number(0, low_open=True)),
    ("kl_weight", number(0)),
    ("episodes_per_step", integer(2)),  # episode-return tuning (armodal/control/tuning.py)
]
