"""Closed-loop evaluation of an action run: the model, the scripted expert and a behaviour-cloning
baseline play the same seeded episodes; mean and std of the return and the control loop's
environment steps per second are reported for each.

Every player is an `Agent` stepped in lockstep over a batch of environments: the model through
SequencePolicy (one KV cache across timesteps), a stateless policy (expert, BC) through
`Stateless`. Evaluation seeds start at `first_seed` (default 10,000), away from the seeds
0 .. n-1 the training rollouts used.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from armodal.control.experts import Policy
from armodal.control.rollout import make_env
from armodal.data.episodes import Episode

__all__ = ["Agent", "Stateless", "Score", "play", "behaviour_cloning", "format_table"]


class Agent(Protocol):
    """Acts for a batch of environments, one timestep at a time."""

    def reset(self, observations: np.ndarray, target_return: float | None = None) -> None: ...
    def act(self) -> np.ndarray: ...
    def observe(self, observations: np.ndarray, rewards: np.ndarray) -> None: ...


class Stateless:
    """An Agent that maps each observation batch (B, D_obs) to actions with `policy`."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def reset(self, observations: np.ndarray, target_return: float | None = None) -> None:
        self.observations = observations

    def act(self) -> np.ndarray:
        return self.policy(np.asarray(self.observations, dtype=np.float32))

    def observe(self, observations: np.ndarray, rewards: np.ndarray) -> None:
        self.observations = observations


@dataclass
class Score:
    policy: str
    mean: float
    std: float
    episodes: int
    steps: int
    seconds: float
    returns: list[float]

    @property
    def steps_per_second(self) -> float:
        return self.steps / self.seconds

    def as_dict(self) -> dict:
        return {**asdict(self), "steps_per_second": self.steps_per_second}


def play(agent: Agent, env_id: str, seeds: list[int], batch_size: int, name: str,
         target_return: float | None = None,
         on_act: Callable[[np.ndarray], None] | None = None) -> Score:
    """One episode per seed, `batch_size` environments at a time; each row's episode ends when
    its environment terminates or truncates, and the batch when all have. `on_act(running)`
    is called after each act() with the rows (B,) bool whose episodes still run."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    returns, steps, start = [], 0, time.perf_counter()
    for first in range(0, len(seeds), batch_size):
        chunk = seeds[first:first + batch_size]
        envs = [make_env(env_id) for _ in chunk]
        obs = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, chunk)])
        agent.reset(obs, target_return)
        done, total = np.zeros(len(chunk), bool), np.zeros(len(chunk))
        while True:
            actions = agent.act()
            if on_act is not None:
                on_act(~done)
            rewards = np.zeros(len(chunk))
            for i, env in enumerate(envs):
                if done[i]:
                    continue  # an ended row keeps its last observation; its action is ignored
                obs[i], rewards[i], terminated, truncated, _ = env.step(actions[i])
                done[i] = terminated or truncated
                steps += 1
            total += rewards
            if done.all():
                break
            agent.observe(obs, rewards)
        returns.extend(total.tolist())
        for env in envs:
            env.close()
    seconds = time.perf_counter() - start
    values = np.array(returns)
    return Score(name, float(values.mean()), float(values.std()), len(values), steps, seconds,
                 returns)


def behaviour_cloning(episodes: list[Episode], seed: int = 0, max_iter: int = 60) -> Policy:
    """A behaviour-cloning baseline: an MLP (scikit-learn, standardised inputs, two hidden
    layers of 128) fitted to map observations to actions over `episodes`; a classifier for
    discrete actions, a regressor for continuous ones."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier, MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = np.concatenate([ep.observations for ep in episodes])
    y = np.concatenate([ep.actions for ep in episodes])
    kind = MLPClassifier if episodes[0].discrete else MLPRegressor
    model = make_pipeline(StandardScaler(), kind(hidden_layer_sizes=(128, 128),
                                                 max_iter=max_iter, early_stopping=True,
                                                 random_state=seed))
    with warnings.catch_warnings():  # a fixed budget on purpose: the baseline stays quick
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y if episodes[0].discrete or y.shape[1] > 1 else y[:, 0])
    if episodes[0].discrete:
        return lambda obs: model.predict(obs).astype(np.int64)
    low = np.min(y, axis=0)
    high = np.max(y, axis=0)
    dim = y.shape[1]
    return lambda obs: np.clip(model.predict(obs).reshape(-1, dim), low, high).astype(np.float32)


def format_table(scores: list[Score], env_id: str, batch_size: int) -> str:
    """The evaluation table: one row per policy."""
    lines = [f"{env_id}: {scores[0].episodes} seeded episodes per policy, {batch_size} "
             f"environments per batch",
             f"{'policy':<28} {'return mean':>12} {'std':>9} {'steps':>8} {'steps/s':>9}"]
    for s in scores:
        lines.append(f"{s.policy:<28} {s.mean:>12.1f} {s.std:>9.1f} {s.steps:>8d} "
                     f"{s.steps_per_second:>9.0f}")
    return "\n".join(lines)


@dataclass
class ControlEval:
    env_id: str
    batch_size: int
    scores: list[Score]

    def table(self) -> str:
        return format_table(self.scores, self.env_id, self.batch_size)

    def as_dict(self) -> dict:
        return {"env_id": self.env_id, "batch_size": self.batch_size,
                "scores": [s.as_dict() for s in self.scores]}


def evaluate_run(run, episodes: int = 50, first_seed: int = 10_000, batch_size: int = 10,
                 target_return: float | list[float] | None = None, baselines: bool = True,
                 decoding=None) -> ControlEval:
    """Play a loaded action run (armodal.checkpoint.LoadedRun) for `episodes` seeded episodes,
    once per target return (return-to-go runs; None: the run's default, the 90th
    percentile of the training returns), then the
    scripted expert (where armodal has one) and a behaviour-cloning MLP fitted on the run's
    training episodes, on the same seeds."""
    from armodal.control.experts import EXPERT_ENVS, scripted_expert
    from armodal.control.policy import SequencePolicy
    from armodal.data.action_module import ActionDataModule

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    info = run.meta["action"]
    env_id, seeds = info["env_id"], list(range(first_seed, first_seed + episodes))
    policy = SequencePolicy(run.model, run.tokenizer, info["context"], decoding)
    if not run.tokenizer.has_returns:
        targets = [None]
    elif target_return is None:
        targets = [info["target_return"]]
    else:
        targets = list(target_return) if isinstance(target_return, (list, tuple)) \
            else [target_return]
    scores = [play(policy, env_id, seeds, batch_size, "armodal" if target is None else
                   f"armodal (target {target:g})", target) for target in targets]
    if baselines:
        if env_id in EXPERT_ENVS:
            scores.append(play(Stateless(scripted_expert(env_id)), env_id, seeds, batch_size,
                               "scripted expert"))
        dm = ActionDataModule.for_run(run.meta["train_config"], run.tokenizer)
        dm.prepare_shards()
        scores.append(play(Stateless(behaviour_cloning(dm.train_episodes)), env_id, seeds,
                           batch_size, "behaviour cloning (MLP)"))
    return ControlEval(env_id, batch_size, scores)
