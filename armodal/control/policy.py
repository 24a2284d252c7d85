"""SequencePolicy: a trained action model acting in closed loop, one KV cache across timesteps.

Per timestep the policy is told what the environment did (`observe`: the new observation, the
reward of the last action), injects the return-to-go and observation tokens into the running
sequence, and decodes the action tokens (`act`), each inside its dimension's id range (segment
masks). Nothing is recomputed: each step feeds only its new tokens through the cache, one
forward per step for a one-dimensional action (the previous action's token rides along with the
next observation's).

The model saw windows of at most `context` timesteps that start at a timestep boundary. When the
next tokens would overflow that, the context slides: the cache is rebuilt from the newest
context // 2 timesteps (one prefill), so every decision sees between context // 2 and context
timesteps, as in training.

Rows of a batch are separate environments stepped in lockstep; a row whose episode has ended
keeps receiving its last observation and its actions are ignored by the caller.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from armodal.generation.config import DecodingConfig
from armodal.generation.processors import process_logits
from armodal.generation.sampling import RowSampler
from armodal.tokenizers.trajectory import TrajectoryTokenizer

__all__ = ["SequencePolicy"]


class SequencePolicy:
    """Acts for `batch_size` environments at once with a model trained on trajectories.

    Args:
        model: the run's Transformer (n_streams = 1).
        tokenizer: the run's fitted TrajectoryTokenizer.
        context: timesteps per training window (the run's domain.data.context).
        decoding: greedy (default) or sample with temperature / top-k / top-p / min-p; one
            seeded random stream per row.
    """

    def __init__(self, model: nn.Module, tokenizer: TrajectoryTokenizer, context: int,
                 decoding: DecodingConfig | None = None, seeds: list[int] | None = None) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.decoding = decoding or DecodingConfig(strategy="greedy")
        if self.decoding.strategy not in ("greedy", "sample"):
            raise ValueError(f"decoding strategy {self.decoding.strategy!r} is not supported in "
                             f"the control loop; use greedy or sample")
        self.group = tokenizer.group
        self.n_action = tokenizer.dims()["action"]
        self.n_observation = tokenizer.dims()["observation"]
        self.context = context
        need = context * self.group - 1
        if model.config.max_seq_len < need:
            raise ValueError(f"context={context} timesteps of {self.group} tokens need "
                             f"max_seq_len >= {need}; the model has {model.config.max_seq_len}")
        model.eval()  # no dropout while acting
        self.device = next(model.parameters()).device
        self.masks = tokenizer.action_masks().to(self.device)  # (D_act, V)
        self.seeds = seeds
        lo, hi = (tokenizer.parts["return"].bin_edges[0, [0, -1]] if tokenizer.has_returns
                  else (None, None))
        self.return_range = (lo, hi)
        self.observation_range = tokenizer.parts["observation"].bin_edges[:, [0, -1]].T

    # --- one episode ------------------------------------------------------------------------

    @torch.inference_mode()
    def reset(self, observations: np.ndarray, target_return: float | np.ndarray | None = None
              ) -> None:
        """Start episodes from observations (B, D_obs); `target_return` (a float or (B,)) is
        the return to ask for, required when the model was trained with returns-to-go."""
        if self.tokenizer.has_returns and target_return is None:
            raise ValueError("this model is conditioned on returns-to-go: pass target_return "
                             "(e.g. the best training return)")
        observations = self._check_observations(observations)
        self.batch = len(observations)
        self.rtg = None if not self.tokenizer.has_returns else \
            np.broadcast_to(np.asarray(target_return, dtype=np.float64), (self.batch,)).copy()
        self.cache = self.model.new_cache(self.batch, self.model.config.max_seq_len)
        self.steps: list[np.ndarray] = []  # (B, G) global ids of each finished timestep
        self.current = self._step_head(observations)  # (B, G - D_act): this step so far
        self.pending = torch.from_numpy(self.current).to(self.device)  # not yet in the cache
        seeds = self.seeds if self.seeds is not None else [self.decoding.seed] * self.batch
        if len(seeds) != self.batch:
            raise ValueError(f"seeds has {len(seeds)} entries for a batch of {self.batch}")
        self.sampler = None if self.decoding.is_greedy else \
            RowSampler(list(seeds), list(range(self.batch)), self.device)

    @torch.inference_mode()
    def act(self) -> np.ndarray:
        """Decode this timestep's action tokens; returns env actions (B,) or (B, D_act)."""
        if self.current is None:
            raise ValueError("act() follows reset() or observe(): each timestep is observe, "
                             "then act")
        if self.cache.pos + self.pending.shape[1] + self.n_action - 1 > self.cache.max_len:
            self.pending = self._slide()
        chosen = []
        for k in range(self.n_action):
            logits = self._feed(self.pending)  # (B, V)
            self.last_logits = logits
            logits = process_logits(logits, self.decoding, 0, self.masks[k])
            token = logits.argmax(-1) if self.sampler is None else \
                self.sampler.sample(logits.softmax(-1))  # (B,)
            chosen.append(token)
            self.pending = token[:, None]
        actions = torch.stack(chosen, 1).cpu().numpy()  # (B, D_act) global ids
        self.steps.append(np.concatenate([self.current, actions], 1))
        del self.steps[:-self.context]  # a slide never keeps more
        self.current = None
        return self.tokenizer.actions_from_ids(actions)

    @torch.inference_mode()
    def observe(self, observations: np.ndarray, rewards: np.ndarray) -> None:
        """The environment's answer to the last action: next observations (B, D_obs) and the
        rewards (B,) it earned (they lower the return still to go)."""
        if self.current is not None:
            raise ValueError("observe() follows act(): each timestep is observe, then act")
        observations = self._check_observations(observations)
        if len(observations) != self.batch:
            raise ValueError(f"observations have {len(observations)} rows; the episode batch "
                             f"has {self.batch}")
        if self.rtg is not None:
            self.rtg = self.rtg - np.asarray(rewards, dtype=np.float64)
        self.current = self._step_head(observations)
        fresh = torch.from_numpy(self.current).to(self.device)
        self.pending = torch.cat([self.pending, fresh], 1)  # last action token + new step

    def decision_context(self) -> Tensor:
        """(B, n) global ids the last action token was decoded after: what the cache holds
        (an uncached forward over them gives the same logits as `last_logits`)."""
        return self._cached

    # --- internals --------------------------------------------------------------------------

    def _step_head(self, observations: np.ndarray) -> np.ndarray:
        """(B, G - D_act) global ids: [return-to-go] observation tokens."""
        parts = []
        if self.rtg is not None:
            lo, hi = self.return_range
            parts.append(self.tokenizer.part_ids("return", np.clip(self.rtg, lo, hi)))
        # States the training data never reached are clamped into its range without a warning
        # per step: the nearest bins are the model's best guess of what it sees.
        lo, hi = self.observation_range
        parts.append(self.tokenizer.part_ids("observation", np.clip(observations, lo, hi)))
        return np.concatenate(parts, 1)

    def _feed(self, ids: Tensor) -> Tensor:
        """Run new ids (B, n) through the cache; next-token logits (B, V) after them."""
        fresh = self.cache.pos == 0
        logits = self.model(ids, self.cache)[:, -1].float()
        self._cached = ids if fresh else torch.cat([self._cached, ids], 1)
        return logits

    def _slide(self) -> Tensor:
        """A fresh cache; returns the ids to prefill it with: the newest context // 2 finished
        timesteps and this step's tokens so far."""
        keep = self.steps[len(self.steps) - self.context // 2:]
        ids = np.concatenate([*keep, self.current], 1)
        self.cache = self.model.new_cache(self.batch, self.model.config.max_seq_len)
        return torch.from_numpy(ids).to(self.device)

    def _check_observations(self, observations: np.ndarray) -> np.ndarray:
        observations = np.asarray(observations, dtype=np.float32)
        dim = self.n_observation
        if observations.ndim != 2 or observations.shape[1] != dim:
            raise ValueError(f"observations must be (B, {dim}), got shape {observations.shape}")
        return observations
