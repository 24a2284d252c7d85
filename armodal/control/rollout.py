"""Rolling policies out in gymnasium environments, and the demonstration datasets built so.

`Rollouts` is the data source of the action recipes: the scripted expert of an environment and
noisy versions of it (so the data mixes high and low returns, which return conditioning needs)
play `n_episodes` seeded episodes, stored once as episode files under `cache_dir` and read back
on later runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np

from armodal.control.experts import Policy, noisy, scripted_expert
from armodal.data.episodes import Episode, EpisodeFolder, save_episode

__all__ = ["make_env", "rollout", "Rollouts"]

FORMAT_VERSION = 1


def make_env(env_id: str) -> gym.Env:
    """gymnasium.make(env_id), with an error that names the id and the classic-control ones."""
    try:
        return gym.make(env_id)
    except gym.error.Error as err:
        known = sorted(k for k, spec in gym.registry.items()
                       if "classic_control" in str(spec.entry_point))
        raise ValueError(f"unknown environment id {env_id!r} ({type(err).__name__}); "
                         f"gymnasium's classic-control ids: {', '.join(known)}") from err


def rollout(env: gym.Env, policy: Policy, seed: int, meta: dict | None = None) -> Episode:
    """One episode of `policy` in `env`, reset with `seed`, until it terminates or truncates."""
    obs, _ = env.reset(seed=seed)
    observations, actions, rewards = [], [], []
    while True:
        action = policy(np.asarray(obs, dtype=np.float32)[None])[0]
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = env.step(action)
        rewards.append(reward)
        if terminated or truncated:
            break
    info = {"env_id": env.spec.id, "seed": seed, "terminated": bool(terminated),
            "truncated": bool(truncated), **(meta or {})}
    return Episode(np.stack(observations), np.stack(actions), np.asarray(rewards), info)


class Rollouts:
    """`n_episodes` of the scripted expert of `env_id`, episode i played with noise level
    noise[i % len(noise)] (armodal.control.experts.noisy) from reset seed `seed + i`.

    Built once into `<cache_dir>/<env_id>-<key>/` (episode files, then meta.json, written
    last, in a temp dir renamed into place) and read from there afterwards."""

    def __init__(self, env_id: str, n_episodes: int = 200, noise: Sequence[float] = (0.0,),
                 seed: int = 0, cache_dir: str = "~/.cache/armodal/episodes") -> None:
        scripted_expert(env_id)  # refuses an environment without an expert, before any work
        if n_episodes < 1:
            raise ValueError(f"n_episodes must be >= 1, got {n_episodes}")
        noise = [float(x) for x in noise]
        if not noise or min(noise) < 0:
            raise ValueError(f"noise must be a non-empty list of levels >= 0, got {noise}")
        self.env_id, self.n_episodes, self.noise, self.seed = env_id, n_episodes, noise, seed
        self.cache_dir = Path(cache_dir).expanduser()

    @property
    def path(self) -> Path:
        key = json.dumps([FORMAT_VERSION, self.env_id, self.n_episodes, self.noise, self.seed,
                          gym.__version__])
        return self.cache_dir / f"{self.env_id}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"

    def load(self) -> list[Episode]:
        if not (self.path / "meta.json").is_file():
            self._build()
        return EpisodeFolder(str(self.path)).load()

    def _build(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=".building-"))
        env, expert = make_env(self.env_id), scripted_expert(self.env_id)
        returns = []
        for i in range(self.n_episodes):
            level = self.noise[i % len(self.noise)]
            policy = noisy(expert, env.action_space, level,
                           np.random.default_rng(self.seed + i))
            episode = rollout(env, policy, self.seed + i, {"policy": "scripted", "noise": level})
            save_episode(tmp / f"episode_{i:05d}.npz", episode)
            returns.append(episode.episode_return)
        (tmp / "meta.json").write_text(json.dumps({
            "env_id": self.env_id, "n_episodes": self.n_episodes, "noise": self.noise,
            "seed": self.seed, "mean_return": float(np.mean(returns)),
            "max_return": float(np.max(returns))}, indent=2))
        env.close()
        try:
            os.replace(tmp, self.path)
        except OSError:  # another process finished the same build first
            shutil.rmtree(tmp, ignore_errors=True)
