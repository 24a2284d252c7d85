"""Exact resume: what lets a killed or stopped training run continue as if never interrupted.

ResumableLoader    every training DataLoader: its checkpointed state is the sampler generator's
                   state when the epoch began, the epoch's number and the batches of the epoch
                   already trained on; resuming replays the sampler past them (indices only, no
                   sample is read), so the rest of the run sees the very batches, in the very
                   order. A dataset with `random_items = True` (random crops, augmentation,
                   condition dropout) draws each item's random numbers from global RNGs seeded
                   by (run seed, epoch, index): the same items with any num_workers, resumed.
ExactResume        a callback: counts finished steps for the loader (which runs a batch ahead)
                   and keeps python's, numpy's and torch's global RNG states in the checkpoint.
StopOnSignal       SIGTERM / SIGINT: finish the step, save last.ckpt, stop (RunStopped).
AtomicCheckpointIO checkpoints written beside their final name, flushed, renamed into place.
fit_resumable      trainer.fit from resume=auto / a checkpoint path, refusing pickled code;
                   raises RunStopped when StopOnSignal stopped the run.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["AtomicCheckpointIO", "ExactResume", "ResumableLoader", "RunStopped", "StopOnSignal",
           "fit_resumable", "item_seed", "resume_from", "rng_states", "seeded_rngs",
           "set_rng_states"]


def item_seed(base: int, epoch: int, index: int) -> int:
    """The 64-bit seed of item `index` in epoch `epoch` (from 0) of a loader whose sampler
    generator was seeded with `base`: a hash, so neighbouring items and epochs get unrelated
    streams, and the same in every process (python's hash() of a str is salted per process)."""
    digest = hashlib.blake2b(f"{base}/{epoch}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


@contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Run the block with torch's (CPU), python's and numpy's global RNGs seeded from `seed`,
    then put the caller's states back: in the main process (num_workers=0) the training's own
    draws (dropout, quantizer restarts) never see how many numbers an item drew."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    # Not torch.manual_seed: it also reseeds every CUDA generator, the training's dropout.
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)  # numpy takes 32-bit seeds
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class _SeededItems(Dataset):
    """`dataset` (one with random_items) read by keys (seed, index): each item drawn under
    seeded_rngs(seed), so it is a function of its key alone, whichever process reads it."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        with seeded_rngs(seed):
            return self.dataset[index]


class _SkippingSampler(Sampler):
    """`inner`'s indices, the first `skip` of them passed over once (after a restore); as keys
    (seed_of(index), index) for a _SeededItems dataset when `seed_of` is set.

    Exactly len(inner) of them, never a request past the last: RandomSampler draws once more
    from its generator when asked for more, which Lightning never does (it knows the epoch's
    length) but prefetching workers do. So the generator advances alike with any num_workers
    and in ResumableLoader._replay_epoch."""

    def __init__(self, inner: Sampler[int]) -> None:
        self.inner, self.skip = inner, 0
        self.seed_of: Callable[[int], int] | None = None  # set by the loader every epoch

    def __iter__(self) -> Iterator:
        indices = islice(self.inner, self.skip, len(self.inner))
        self.skip = 0
        if self.seed_of is None:
            return indices
        seed_of = self.seed_of
        return ((seed_of(i), i) for i in indices)

    def __len__(self) -> int:
        return len(self.inner)


def _epoch_of(state: dict) -> int:
    """The epoch a loader state was saved in; a checkpoint from before the epoch was kept is
    read as epoch 0, which only datasets with random_items (never exact then) depend on."""
    return state.get("epoch", 0)


class ResumableLoader(DataLoader):
    """A DataLoader over `sampler` (a sampler with a `generator`, e.g. RandomSampler) with
    `state_dict()` / `load_state_dict()` for Lightning.

    The ExactResume callback tells it each finished step (`step_done`): the loader itself runs
    a batch ahead of training, since Lightning prefetches one to know the epoch's last batch.

    A dataset whose `random_items` is true draws random numbers per item; each item then runs
    under global RNGs seeded by item_seed(the generator's seed, the epoch, its index), so the
    items are the same in the main process and in workers, persistent or not, and after a
    restore. Other datasets are read as they are, by plain indices."""

    def __init__(self, dataset: Dataset, sampler: Sampler[int], batch_size: int,
                 **kwargs: Any) -> None:
        self._seeds_items = bool(getattr(dataset, "random_items", False))
        super().__init__(_SeededItems(dataset) if self._seeds_items else dataset,
                         batch_size=batch_size, sampler=_SkippingSampler(sampler), **kwargs)
        self._draws = sampler.generator  # the generator the sampler draws the order from
        self._epoch_start: torch.Tensor | None = None  # its state when the epoch began
        self._epoch = -1  # the current epoch, from 0 (-1: none begun)
        self._done = 0  # batches of this epoch the training loop has finished
        self._restore: dict | None = None

    def __iter__(self) -> Iterator:
        restore, self._restore = self._restore, None
        if restore is not None and restore["batches"] >= len(self):
            self._replay_epoch(restore)  # saved at the epoch's end: a new one begins
            restore = None
        if restore is None:
            self._epoch += 1
            self._done = 0
            self._epoch_start = self._draws.get_state()
        else:
            self._epoch, self._done = _epoch_of(restore), restore["batches"]
            self._draws.set_state(restore["generator"])
            self._epoch_start = restore["generator"]
            self.sampler.skip = restore["batches"] * self.batch_size
        if self._seeds_items:
            self.sampler.seed_of = partial(item_seed, self._draws.initial_seed(), self._epoch)
        if restore is None:
            return self._epoch_iterator()
        # The epoch's iterator draws the workers' base seed (from torch's global RNG when the
        # loader has no generator); the uninterrupted run drew it before the checkpoint, whose
        # RNG states are already restored, so this draw must leave no trace.
        global_rng = torch.get_rng_state()
        iterator = self._epoch_iterator()
        torch.set_rng_state(global_rng)
        return iterator

    def _epoch_iterator(self) -> Iterator:
        """DataLoader's iterator, after one draw of the workers' base seed from the loader's
        generator (else torch's global RNG), every epoch: a new iterator draws it itself;
        persistent workers keep theirs, and a stand-in draw keeps the data order (and the RNG
        draws) the same with any num_workers, and what _replay_epoch replays."""
        if self.persistent_workers and self._iterator is not None:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()

    def _replay_epoch(self, restore: dict) -> None:
        """Leave the generator where the whole epoch `restore` describes leaves it: the draws
        of the workers' base seed (when it shares the generator) and of the sampler, indices
        only."""
        self._epoch = _epoch_of(restore)
        self._draws.set_state(restore["generator"])
        if self.generator is self._draws:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for _ in islice(self.sampler.inner, len(self.sampler)):
            pass

    def step_done(self) -> None:
        self._done += 1

    def state_dict(self) -> dict:
        return {"generator": self._epoch_start, "epoch": self._epoch, "batches": self._done}

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


def resume_from(resume: str | None, run_dir: Path) -> str | None:
    """The checkpoint to continue from: resume=auto takes <run_dir>/checkpoints/last.ckpt when
    a killed run left one (and starts afresh when not), any other value is a checkpoint path."""
    if resume is None:
        return None
    if resume == "auto":
        last = Path(run_dir) / "checkpoints" / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(resume).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a file; pass resume=auto (with "
                                f"run_dir=<the run's dir>) or a Lightning checkpoint such as "
                                f"<run dir>/checkpoints/last.ckpt")
    return resume


def fit_resumable(trainer: L.Trainer, module: L.LightningModule, run_dir: Path,
                  resume: str | None, **fit_kwargs: Any) -> None:
    """trainer.fit(module, **fit_kwargs) from the checkpoint `resume` names (see resume_from),
    loaded as data only; raises RunStopped when a StopOnSignal callback stopped the run."""
    ckpt_path = resume_from(resume, run_dir)
    try:  # weights_only: a checkpoint someone handed over is data, never code to run
        trainer.fit(module, ckpt_path=ckpt_path, weights_only=True, **fit_kwargs)
    except pickle.UnpicklingError as err:
        raise ValueError(f"refusing checkpoint {ckpt_path}: it holds objects other than tensors "
                         f"and plain data, which could run code when unpickled ({err})") from err
    for callback in trainer.callbacks:
        if isinstance(callback, StopOnSignal) and callback.received is not None:
            raise RunStopped(f"{callback.received} at step {trainer.global_step}: saved "
                             f"{callback.dirpath / 'last.ckpt'}; continue with the same command "
                             f"plus resume=auto run_dir={run_dir}", callback.received)
