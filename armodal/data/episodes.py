"""Episodes of a control task on disk: one `.npz` file per episode, plus a loader for folders.

An episode file holds three arrays and a JSON metadata string:

    observations  (T, D_obs) float32   the observation each action was taken in
    actions       (T,) int64 (discrete) or (T, D_act) float32 (continuous)
    rewards       (T,) float32         the reward that action earned
    meta          JSON: env_id (required), and any of policy, noise, seed, terminated, truncated

Anyone can write episodes in this format (numpy.savez with those keys) and train on them with
`EpisodeFolder`; the rollouts armodal generates itself (armodal.control.rollout) are stored the
same way.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Episode", "EpisodeFolder", "REQUIRED_FIELDS", "load_episode", "save_episode",
           "check_episodes"]

REQUIRED_FIELDS = ("observations", "actions", "rewards", "meta")


F32_MAX = float(np.finfo(np.float32).max)


@dataclass
class Episode:
    observations: np.ndarray  # (T, D_obs) float32
    actions: np.ndarray  # (T,) int64 or (T, D_act) float32
    rewards: np.ndarray  # (T,) float32
    meta: dict = field(default_factory=dict)  # env_id, policy, noise, seed, ...

    def __post_init__(self) -> None:
        who = self.meta.get("path", "episode")
        for name in ("observations", "actions", "rewards"):
            value = np.asarray(getattr(self, name))
            if value.dtype.kind not in "biuf":  # not strings, dates, complex or objects
                raise ValueError(f"{who}: {name} must be real numbers, got dtype {value.dtype}")
            if not np.isfinite(value).all():
                raise ValueError(f"{who}: {name} holds NaN or inf values")
            if value.dtype.kind == "f" and np.abs(value).max(initial=0) > F32_MAX:
                # the float32 cast below would turn such a value into inf
                raise ValueError(f"{who}: {name} holds values beyond float32's range "
                                 f"(|x| <= {F32_MAX:.4g}), which episodes are stored in")
            setattr(self, name, value)
        if self.actions.ndim == 1 and ((self.actions != np.round(self.actions)).any()
                                       or np.abs(self.actions).max(initial=0) >= 2**62):
            raise ValueError(f"{who}: (T,) actions are discrete and must be whole numbers (action "
                             f"indices); store continuous actions as (T, D_act)")
        self.observations = self.observations.astype(np.float32)
        self.rewards = self.rewards.astype(np.float32)
        self.actions = self.actions.astype(np.int64 if self.discrete else np.float32)
        self._check()

    @property
    def discrete(self) -> bool:
        return np.asarray(self.actions).ndim == 1

    @property
    def length(self) -> int:
        return len(self.rewards)

    @property
    def episode_return(self) -> float:
        return float(self.rewards.sum(dtype=np.float64))

    @property
    def env_id(self) -> str:
        return self.meta["env_id"]

    def returns_to_go(self) -> np.ndarray:
        """(T,) float32: rtg[t] = rewards[t] + rewards[t+1] + ... (the return still to come)."""
        return np.cumsum(self.rewards[::-1], dtype=np.float64)[::-1].astype(np.float32)

    def _check(self) -> None:
        who = self.meta.get("path", "episode")
        if "env_id" not in self.meta:
            raise ValueError(f"{who}: meta has no env_id (e.g. 'CartPole-v1')")
        t = len(self.rewards) if self.rewards.ndim == 1 else 0
        if t == 0:
            raise ValueError(f"{who}: rewards must be (T,) with T >= 1, got shape "
                             f"{self.rewards.shape}")
        if self.observations.ndim != 2 or len(self.observations) != t:
            raise ValueError(f"{who}: observations must be (T={t}, D_obs), got shape "
                             f"{self.observations.shape}")
        if self.actions.ndim not in (1, 2) or len(self.actions) != t:
            raise ValueError(f"{who}: actions must be (T={t},) discrete or (T={t}, D_act) "
                             f"continuous, got shape {self.actions.shape}")


def save_episode(path: str | Path, episode: Episode) -> Path:
    """Write `episode` to `path` (.npz), under a temporary name renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, observations=episode.observations, actions=episode.actions,
             rewards=episode.rewards, meta=json.dumps(episode.meta))
    os.replace(tmp, path)
    return path


def load_episode(path: str | Path) -> Episode:
    """Read one episode file; ValueError naming the file and the missing field or bad shape."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in REQUIRED_FIELDS if name in data.files}
    # What numpy and zipfile raise for a torn, corrupted or foreign file (an object array,
    # an "encrypted" or unknown-compression member): one error that names the file.
    except (OSError, EOFError, ValueError, RuntimeError, NotImplementedError,
            zipfile.BadZipFile) as err:
        raise ValueError(f"episode file {path} cannot be read as .npz "
                         f"({type(err).__name__}: {err})") from err
    missing = [name for name in REQUIRED_FIELDS if name not in arrays]
    if missing:
        raise ValueError(f"episode file {path} lacks {', '.join(missing)}; an episode "
                         f"needs {', '.join(REQUIRED_FIELDS)} (armodal.data.episodes)")
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except json.JSONDecodeError as err:
        raise ValueError(f"episode file {path}: meta is not a JSON string ({err})") from err
    if not isinstance(meta, dict):
        raise ValueError(f"episode file {path}: meta must be a JSON object, got {meta!r}")
    return Episode(**arrays, meta={**meta, "path": str(path)})


def check_episodes(episodes: list[Episode], who: str) -> list[Episode]:
    """Refuse an empty list, and episodes of different environments or shapes."""
    if not episodes:
        raise ValueError(f"{who} holds no episodes")
    first = episodes[0]
    for ep in episodes[1:]:
        same = (ep.env_id == first.env_id and ep.discrete == first.discrete
                and ep.observations.shape[1] == first.observations.shape[1]
                and ep.actions.shape[1:] == first.actions.shape[1:])
        if not same:
            raise ValueError(
                f"{who} mixes episodes: {ep.meta.get('path', ep.env_id)} is {ep.env_id} with "
                f"observations {ep.observations.shape[1:]}, actions {ep.actions.shape[1:]}, but "
                f"{first.meta.get('path', first.env_id)} is {first.env_id} with observations "
                f"{first.observations.shape[1:]}, actions {first.actions.shape[1:]}")
    return episodes


class EpisodeFolder:
    """Every `*.npz` episode file under `root` (sorted by name), all of one environment."""

    def __init__(self, root: str) -> None:
        self.root = Path(root).expanduser()

    def files(self) -> list[Path]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"episode folder {str(self.root)!r} does not exist")
        files = sorted(p for p in self.root.rglob("*.npz") if not p.name.endswith(".tmp.npz"))
        if not files:
            raise FileNotFoundError(f"episode folder {str(self.root)!r} holds no .npz episode "
                                    f"files")
        return files

    def load(self) -> list[Episode]:
        return check_episodes([load_episode(p) for p in self.files()], str(self.root))
