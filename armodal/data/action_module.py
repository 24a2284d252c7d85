"""ActionDataModule: episodes -> fitted TrajectoryTokenizer -> windows of timesteps.

A window is `context` consecutive timesteps of one episode, G tokens each (TrajectoryTokenizer),
starting at a timestep boundary so the model always knows where in the group it is:

    r_s o_s[0..D_obs) a_s[0..D_act)  r_s+1 o_s+1 ... a_s+context-1

The model's context is context * G - 1 tokens: the last action token is a target, never an
input. Windows of episodes shorter than `context` are right-padded with <pad>, which carries no
loss. `loss_on="actions"` (the default, Decision Transformer's choice) learns only the action
tokens; "all" also learns to predict observations and returns (a world model as a side task).
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.data.datamodule import evenly_spaced, make_loader, make_train_loader
from armodal.data.episodes import Episode, check_episodes
from armodal.data.splits import split_indices
from armodal.tokenizers.trajectory import TrajectoryTokenizer

LOSS_ON = ("actions", "all")


class EpisodeSource(Protocol):
    def load(self) -> list[Episode]: ...


class TimestepWindows(Dataset):
    """Windows of `context` timesteps: item i is window starts[i] = (episode, first step).

    Each item is {"tokens": (context * G,) int64 global ids, "loss_mask": (context * G,) bool}.
    """

    def __init__(self, episodes: list[np.ndarray], starts: np.ndarray, context: int,
                 learned: np.ndarray, pad_id: int) -> None:
        self.episodes, self.starts, self.context = episodes, starts, context
        self.learned, self.pad_id = learned, pad_id  # learned: (G,) bool per slot

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        episode, start = self.starts[i]
        steps = self.episodes[episode][start:start + self.context]  # (n <= context, G)
        group = steps.shape[1]
        tokens = np.full((self.context, group), self.pad_id, dtype=np.int64)
        tokens[:len(steps)] = steps
        mask = np.zeros((self.context, group), dtype=bool)
        mask[:len(steps)] = self.learned
        return {"tokens": torch.from_numpy(tokens.reshape(-1)),
                "loss_mask": torch.from_numpy(mask.reshape(-1))}


class ActionDataModule(L.LightningDataModule):
    """Train / val windows of episodes from `episodes` (e.g. armodal.control.rollout.Rollouts
    or armodal.data.episodes.EpisodeFolder), split by episode. Call `prepare_shards()` before
    building the model: it loads and splits the episodes and fits the tokenizer on the train
    ones, which fixes the TokenSpace.

    target_return: the return a return-conditioned run is asked for by default (the training
    callback's `val/return`, `armodal eval`); None: the 90th percentile of the training
    returns."""

    def __init__(self, episodes: EpisodeSource, tokenizer: TrajectoryTokenizer, batch_size: int,
                 context: int = 20, loss_on: str = "actions", val_fraction: float = 0.1,
                 split: str = "random", num_workers: int = 0, seed: int = 0,
                 val_batches: int | None = None, target_return: float | None = None) -> None:
        super().__init__()
        if loss_on not in LOSS_ON:
            raise ValueError(f"loss_on={loss_on!r}; allowed: {', '.join(LOSS_ON)}")
        for name, value in (("batch_size", batch_size), ("context", context)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if val_batches is not None and val_batches < 1:
            raise ValueError(f"val_batches must be >= 1 or None, got {val_batches}")
        self.source, self.tokenizer, self.batch_size = episodes, tokenizer, batch_size
        self.context, self.loss_on = context, loss_on
        self.val_fraction, self.split, self.seed = val_fraction, split, seed
        self.num_workers, self.val_batches = num_workers, val_batches
        self.target_return = target_return
        self.train_episodes: list[Episode] | None = None

    @classmethod
    def for_run(cls, train_config: dict, tokenizer: TrajectoryTokenizer) -> ActionDataModule:
        """The data module a run was trained on (its episodes, split and fitted tokenizer)."""
        from armodal.checkpoint import instantiate_from_run

        source = instantiate_from_run(train_config["domain"]["episodes"], "domain.episodes")
        return cls(source, tokenizer, seed=train_config["seed"], **train_config["domain"]["data"])

    def prepare_shards(self) -> TrajectoryTokenizer:
        """Load, check and split the episodes; fit the tokenizer on train (idempotent)."""
        if self.train_episodes is not None:
            return self.tokenizer
        episodes = check_episodes(self.source.load(), type(self.source).__name__)
        train, val = split_indices(len(episodes), self.val_fraction, self.split, self.seed,
                                   "ActionDataModule: episodes")
        self.train_episodes = [episodes[i] for i in train.tolist()]
        self.val_episodes = [episodes[i] for i in val.tolist()]
        if not self.tokenizer.is_fitted:
            self.tokenizer.fit(self.train_episodes)
        self.space = self.tokenizer.space
        parts = np.array(self.tokenizer.slot_parts())
        self.learned = parts == "action" if self.loss_on == "actions" else np.ones_like(parts,
                                                                                      bool)
        self.val_set = self._windows(self.val_episodes, stride=self.context)
        return self.tokenizer

    def _windows(self, episodes: list[Episode], stride: int | None) -> TimestepWindows:
        """Every window start (stride None: each step that leaves a full window, and 0), or
        non-overlapping windows (stride = context) that cover each step once."""
        with warnings.catch_warnings(record=True) as clamped:
            warnings.simplefilter("always")
            ids = [self.tokenizer.episode_ids(ep) for ep in episodes]
        if clamped:  # one summary, not a warning per episode and part
            warnings.warn(f"{len(clamped)} observation / action / return column(s) of "
                          f"{len(episodes)} episodes were clamped into the range fitted on the "
                          f"train episodes; the first: {clamped[0].message}", stacklevel=2)
        starts = []
        for e, steps in enumerate(ids):
            last = max(0, len(steps) - self.context)
            firsts = range(0, last + 1) if stride is None else range(0, len(steps), stride)
            starts.extend((e, s) for s in firsts)
        return TimestepWindows(ids, np.array(starts), self.context, self.learned,
                               self.space.pad_id)

    @property
    def seq_len(self) -> int:
        """The model's context in tokens: `context` timesteps but the last action token."""
        self.prepare_shards()
        return self.context * self.tokenizer.group - 1

    @property
    def n_streams(self) -> int:
        return 1  # the flatten pattern: one token per model step

    def units(self) -> tuple[float, str, tuple[int, int]]:
        """Bits per action token (one action dimension of one timestep)."""
        self.prepare_shards()
        lo = self.space.offset("action")
        return 1.0, "action", (lo, lo + self.space.modalities["action"])

    def run_meta(self) -> dict:
        self.prepare_shards()
        returns = np.array([ep.episode_return for ep in self.train_episodes])
        first = self.train_episodes[0]
        return {"action": {
            "env_id": first.env_id, "context": self.context, "group": self.tokenizer.group,
            "discrete": first.discrete, "loss_on": self.loss_on,
            "train_episodes": len(self.train_episodes), "val_episodes": len(self.val_episodes),
            "train_return_mean": float(returns.mean()), "train_return_max": float(returns.max()),
            "train_return_min": float(returns.min()),
            # What a return-conditioned model is asked for by default: the configured return,
            # else a high one but not the highest, which often only an easy start reached.
            "target_return": float(np.quantile(returns, 0.9) if self.target_return is None
                                   else self.target_return)}}

    def setup(self, stage: str | None = None) -> None:
        self.prepare_shards()
        self.train_set = self._windows(self.train_episodes, stride=None)
        steps = sum(ep.length for ep in self.train_episodes)
        # An epoch: as many random windows as cover every training step about once.
        self._epoch_size = max(self.batch_size, steps // self.context)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed)
        sampler = RandomSampler(self.train_set, replacement=True, num_samples=self._epoch_size,
                                generator=gen)
        return make_train_loader(self.train_set, sampler, self.batch_size, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        cap = None if self.val_batches is None else self.val_batches * self.batch_size
        return self._loader(evenly_spaced(self.val_set, cap), shuffle=False, drop_last=False)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return make_loader(dataset, self.batch_size, self.num_workers, **kwargs)
