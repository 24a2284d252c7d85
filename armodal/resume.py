"""Exact resume: what lets a killed or stopped training run continue as if never interrupted.

ResumableLoader    every training DataLoader: its checkpointed state is the sampler generator's
                   state when the epoch began and the batches of the epoch already trained on;
                   resuming replays the sampler past them (indices only, no sample is read),
                   so the rest of the run sees the very batches, in the very order.
ExactResume        a callback: counts finished steps for the loader (which runs a batch ahead)
                   and keeps python's, numpy's and torch's global RNG states in the checkpoint.
StopOnSignal       SIGTERM / SIGINT: finish the step, save last.ckpt, stop (RunStopped).
AtomicCheckpointIO checkpoints written beside their final name, flushed, renamed into place.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["AtomicCheckpointIO", "ExactResume", "ResumableLoader", "RunStopped", "StopOnSignal",
           "rng_states", "set_rng_states"]


class _SkippingSampler(Sampler[int]):
    """`inner`'s indices, the first `skip` of them passed over once (after a restore)."""

    def __init__(self, inner: Sampler[int]) -> None:
        self.inner, self.skip = inner, 0

    def __iter__(self) -> Iterator[int]:
        indices = iter(self.inner)
        for _ in range(self.skip):
            next(indices)
        self.skip = 0
        return indices

    def __len__(self) -> int:
        return len(self.inner)


class ResumableLoader(DataLoader):
    """A DataLoader over `sampler` (a sampler with a `generator`, e.g. RandomSampler) with
    `state_dict()` / `load_state_dict()` for Lightning.

    The ExactResume callback tells it each finished step (`step_done`): the loader itself runs
    a batch ahead of training, since Lightning prefetches one to know the epoch's last batch."""

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int,
                 **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=_SkippingSampler(sampler),
                         **kwargs)
        self._draws = sampler.generator  # the generator the sampler draws the order from
        self._epoch_start: torch.Tensor | None = None  # its state when the epoch began
        self._done = 0  # batches of this epoch the training loop has finished
        self._restore: dict | None = None

    def __iter__(self) -> Iterator:
        restore, self._restore = self._restore, None
        if restore is not None and restore["batches"] >= len(self):
            self._replay_epoch(restore["generator"])  # saved at the epoch's end: a new one begins
            restore = None
        self._done = 0 if restore is None else restore["batches"]
        if restore is None:
            self._epoch_start = self._draws.get_state()
            return super().__iter__()
        self._draws.set_state(restore["generator"])
        self._epoch_start = restore["generator"]
        self.sampler.skip = restore["batches"] * self.batch_size
        # A new iterator draws the workers' base seed (from torch's global RNG when the loader
        # has no generator); the uninterrupted run drew it before the checkpoint, whose RNG
        # states are already restored, so this draw must leave no trace.
        global_rng = torch.get_rng_state()
        iterator = super().__iter__()
        torch.set_rng_state(global_rng)
        return iterator

    def _replay_epoch(self, start: torch.Tensor) -> None:
        """Leave the generator where a whole epoch begun at `start` leaves it: the draws of the
        workers' base seed (when it shares the generator) and of the sampler, indices only."""
        self._draws.set_state(start)
        if self.generator is self._draws:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for _ in self.sampler.inner:
            pass

    def step_done(self) -> None:
        self._done += 1

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "batches": self._done}

    def load_state_dict(self, state: dict) -> None:
        self._restore = state


class ExactResume(L.Callback):
    """What a checkpoint needs beyond Lightning's own state for a resumed run to continue
    exactly as an uninterrupted one: python's, numpy's and torch's global RNG states (dropout,
    random crops), and each finished step counted by the ResumableLoader."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.step_done()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])


def rng_states() -> dict:
    """The global RNG states as tensors, ints and strings only (a weights_only load reads
    them back without unpickling arbitrary objects)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "python": random.getstate(),
              "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, writing `<path>.tmp` beside the checkpoint, flushed to disk,
    then renamed over it: a process killed while saving leaves the previous checkpoint whole.
    (Lightning's own save renames from the system temp dir, which is a copy, not an atomic
    rename, when that dir is on another filesystem.)"""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


class RunStopped(Exception):
    """Training stopped on a signal after saving a checkpoint; `exit_code` is the shell's
    128 + signal number."""

    def __init__(self, message: str, signal_name: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + int(signal.Signals[signal_name])


class StopOnSignal(L.Callback):
    """SIGTERM (a preempting scheduler) or SIGINT (Ctrl-C) during training: finish the current
    step, save `<dirpath>/last.ckpt`, and stop; `resume=auto` continues from there exactly.
    `received` names the signal afterwards (None when the run ended on its own)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.received: str | None = None
        self._previous: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for sig in self.SIGNALS:
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._note)

    def _note(self, signum: int, frame) -> None:
        self.received = signal.Signals(signum).name

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.received is not None and not trainer.should_stop:
            trainer.save_checkpoint(self.dirpath / "last.ckpt")
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
