"""Scripted experts for gymnasium's classic-control tasks, and noisy versions of any policy.

A policy maps a batch of observations (B, D_obs) float32 to actions: (B,) int64 for a discrete
action space, (B, D_act) float32 for a continuous one. The experts are hand-written controllers
(no learning), good enough to be the demonstrations a sequence model imitates:

    CartPole-v1   linear feedback on angle, angular velocity, position and velocity: 500 / 500
    Pendulum-v1   energy pumping to swing up, PD control near the top: about -140
    Acrobot-v1    torque in the direction of the second joint's velocity: about -80
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["Policy", "EXPERT_ENVS", "scripted_expert", "noisy", "cartpole_expert",
           "pendulum_expert", "acrobot_expert"]

Policy = Callable[[np.ndarray], np.ndarray]
EXPERT_ENVS = ("CartPole-v1", "Pendulum-v1", "Acrobot-v1")


def cartpole_expert(obs: np.ndarray) -> np.ndarray:
    """Push right (1) when the pole leans or swings right, with a little cart centring."""
    x, x_dot, theta, theta_dot = obs.T
    return (theta + 0.5 * theta_dot + 0.05 * x + 0.1 * x_dot > 0).astype(np.int64)


def pendulum_expert(obs: np.ndarray) -> np.ndarray:
    """Pump energy with full torque along the swing until the pendulum has the energy of the
    upright position, then hold it there with PD control on the angle."""
    cos, sin, omega = obs.T
    theta = np.arctan2(sin, cos)  # 0 upright
    # Energy relative to upright, up to a constant factor (rod inertia ml^2/3, g = 10).
    energy = omega ** 2 / 3 + 10 * (cos - 1)
    pump = np.where(energy < 0, 2.0 * np.sign(omega + 1e-6), -0.5 * omega)
    hold = -(10 * theta + 2 * omega)
    return np.clip(np.where(cos > 0.85, hold, pump), -2.0, 2.0)[:, None].astype(np.float32)


def acrobot_expert(obs: np.ndarray) -> np.ndarray:
    """Torque +1 (action 2) when the second link swings positive, -1 (action 0) otherwise: it
    pumps energy into the swing until the tip clears the bar."""
    return np.where(obs[:, 5] > 0, 2, 0).astype(np.int64)


def scripted_expert(env_id: str) -> Policy:
    """The hand-written expert for `env_id` (one of EXPERT_ENVS)."""
    if env_id == "CartPole-v1":
        return cartpole_expert
    if env_id == "Pendulum-v1":
        return pendulum_expert
    if env_id == "Acrobot-v1":
        return acrobot_expert
    raise ValueError(f"no scripted expert for env_id={env_id!r}; armodal has experts for "
                     f"{', '.join(EXPERT_ENVS)} (other environments: bring your own episodes)")


def noisy(policy: Policy, action_space, noise: float, rng: np.random.Generator) -> Policy:
    """`policy` with noise: for a discrete space each action is replaced by a uniformly random
    one with probability `noise` (epsilon-greedy); for a box, Gaussian noise of standard
    deviation `noise` * half the range is added, then clipped to the box."""
    if not 0.0 <= noise:
        raise ValueError(f"noise must be >= 0, got {noise}")
    if noise == 0.0:
        return policy
    if hasattr(action_space, "n"):
        n = int(action_space.n)

        def epsilon(obs: np.ndarray) -> np.ndarray:
            actions = policy(obs)
            random = rng.random(len(actions)) < noise
            return np.where(random, rng.integers(0, n, len(actions)), actions)

        return epsilon
    low, high = action_space.low, action_space.high

    def gaussian(obs: np.ndarray) -> np.ndarray:
        actions = policy(obs)
        jitter = rng.normal(0.0, 1.0, actions.shape) * noise * (high - low) / 2
        return np.clip(actions + jitter, low, high).astype(np.float32)

    return gaussian
