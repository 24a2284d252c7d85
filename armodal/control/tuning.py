"""Sequence-level fine-tuning of an action run on its episode return (REINFORCE).

Each step plays `episodes_per_step` seeded episodes with the current model sampling its actions
(SequencePolicy at `temperature`), keeps for every decision the context it was decoded after and
the action token chosen, and follows

    loss = -mean_i[A_i * sum_t log p(a_it | context_it)] + kl_weight * mean_it[KL_it]

with A_i the episode's return minus the mean return of the other episodes of the step (leave
one out), divided by the returns' spread (returns run to hundreds; the step size should not),
and KL the k3 estimator against the frozen starting model at each chosen action token. An
episode is hundreds of decisions, so the loss is back-propagated in chunks of decisions (it is
a sum over them) rather than through one graph of the whole episode.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from armodal.control.evaluate import play
from armodal.control.policy import SequencePolicy
from armodal.generation import DecodingConfig

__all__ = ["Decisions", "EpisodeTuner", "decision_logprobs", "play_and_record",
           "returns_advantages", "train_episode_level"]


@dataclass
class Decisions:
    """Every action token a batch of episodes chose, with what it was chosen after."""

    contexts: list[Tensor]  # per decision: (n,) global ids the token was decoded after
    tokens: Tensor  # (N,) the chosen global ids
    dims: Tensor  # (N,) which action dimension each token is (its segment mask)
    episode: Tensor  # (N,) which episode (row) each decision belongs to
    returns: Tensor  # (B,) float64 episode returns
    steps: int  # environment steps taken by live episodes


def play_and_record(policy: SequencePolicy, env_id: str, seeds: list[int],
                    target_return: float | None) -> Decisions:
    """One episode per seed, all in one batch; only decisions of episodes still running
    count (a finished row keeps acting on its last observation, ignored)."""
    contexts, tokens, dims, rows = [], [], [], []
    n_action = policy.n_action

    def record(running: np.ndarray) -> None:
        context = policy.decision_context()  # (B, n): before the last action token
        chosen = torch.from_numpy(policy.steps[-1][:, -n_action:])  # (B, D_act) global ids
        for row in np.flatnonzero(running):
            for k in range(n_action):
                # action token k came after the context minus the action tokens that followed
                # clone, outside inference mode: a plain tensor autograd may save later
                contexts.append(context[row, :context.shape[1] - (n_action - 1 - k)].clone())
                tokens.append(int(chosen[row, k]))
                dims.append(k)
                rows.append(int(row))

    score = play(policy, env_id, seeds, len(seeds), "sampled", target_return, on_act=record)
    return Decisions(contexts, torch.tensor(tokens), torch.tensor(dims), torch.tensor(rows),
                     torch.tensor(score.returns, dtype=torch.float64), score.steps)


def returns_advantages(returns: Tensor) -> Tensor:
    """(R_i - mean of the others) / (std of the returns + 1), float32 (B,)."""
    b = len(returns)
    baseline = (returns.sum() - returns) / (b - 1)
    return ((returns - baseline) / (returns.std() + 1.0)).float()


def decision_logprobs(model: torch.nn.Module, decisions: Decisions, index: Tensor,
                      masks: Tensor, temperature: float) -> Tensor:
    """log p(token | context) (len(index),) for the decisions `index`, under the sampling
    distribution: logits / temperature, restricted to the dimension's action ids."""
    contexts = [decisions.contexts[i] for i in index.tolist()]
    lengths = torch.tensor([len(c) for c in contexts])
    device = masks.device
    padded = torch.nn.utils.rnn.pad_sequence(contexts, batch_first=True).to(device)  # (N, L)
    logits = model(padded)  # (N, L, V); right padding never reaches the earlier positions
    last = logits[torch.arange(len(index)), (lengths - 1).to(device)].float() / temperature
    allowed = masks[decisions.dims[index].to(device)]  # (N, V)
    logp = F.log_softmax(last.masked_fill(~allowed, -math.inf), -1)
    return logp.gather(1, decisions.tokens[index].to(device)[:, None]).squeeze(1)


def sampling_policy(model: torch.nn.Module, run, temperature: float,
                    seeds: list[int]) -> SequencePolicy:
    """A SequencePolicy that samples at `temperature` (one seeded stream per episode)."""
    decoding = DecodingConfig(strategy="sample", temperature=temperature)
    return SequencePolicy(model, run.tokenizer, run.meta["action"]["context"], decoding,
                          seeds=seeds)


class EpisodeTuner(L.LightningModule):
    """REINFORCE on a copy of `run.model` (an action run); `run.model` stays the frozen KL
    reference. Manual optimization: each step's loss is back-propagated in chunks."""

    def __init__(self, run, optimizer, scheduler=None, episodes_per_step: int = 8,
                 temperature: float = 1.0, kl_weight: float = 0.05,
                 target_return: float | None = None, seed: int = 0, chunk: int = 512,
                 max_grad_norm: float = 1.0):
        super().__init__()
        if episodes_per_step < 2:
            raise ValueError(f"episodes_per_step={episodes_per_step}; the leave-one-out "
                             f"baseline needs at least 2 episodes per step")
        self.automatic_optimization = False
        self.run, self.env_id = run, run.meta["action"]["env_id"]
        self.model = copy.deepcopy(run.model).requires_grad_(True)
        object.__setattr__(self, "reference", run.model.eval().requires_grad_(False))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.episodes, self.temperature, self.kl_weight = episodes_per_step, temperature, kl_weight
        self.target_return = target_return if run.tokenizer.has_returns else None
        self.seed, self.chunk, self.max_grad_norm = seed, chunk, max_grad_norm

    def training_step(self, batch: Tensor, batch_idx: int) -> None:
        # The step number seeds the environments and the samples: a resume is exact.
        first = (self.seed * 1_000_003 + self.global_step * self.episodes) % 2**31
        seeds = list(range(first, first + self.episodes))
        policy = sampling_policy(self.model, self.run, self.temperature, seeds)
        decisions = play_and_record(policy, self.env_id, seeds, self.target_return)
        advantages = returns_advantages(decisions.returns).to(self.device)  # (B,)
        masks = policy.masks
        optimizer = self.optimizers()
        optimizer.zero_grad()
        n, kl_total = len(decisions.tokens), 0.0
        for index in torch.arange(n).split(self.chunk):
            logp = decision_logprobs(self.model, decisions, index, masks, self.temperature)
            with torch.no_grad():
                ref = decision_logprobs(self.reference, decisions, index, masks,
                                        self.temperature)
            weights = advantages[decisions.episode[index].to(self.device)]
            log_ratio = ref - logp  # log q/p at the chosen tokens
            kl = (log_ratio.exp() - log_ratio - 1).sum()
            self.manual_backward(-(weights * logp).sum() / self.episodes
                                 + self.kl_weight * kl / n)
            kl_total += kl.item()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        self.log_dict({"train/return": decisions.returns.mean().item(),
                       "train/return_std": decisions.returns.std().item(),
                       "train/kl": kl_total / n, "train/env_steps": float(decisions.steps)},
                      prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(list(self.model.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        return [optimizer], [scheduler]


def train_episode_level(cfg):
    """Fine-tune the action run cfg.init_run on its episode return; greedy returns on
    held-out seeds before and after; save a run dir like the start's."""
    from hydra.utils import instantiate

    from armodal.checkpoint import load_run
    from armodal.control.evaluate import evaluate_run
    from armodal.reinforce import tune_and_save
    from armodal.train import start_run

    start = time.perf_counter()
    run_dir = start_run(cfg)
    init = load_run(cfg.init_run)
    if init.tokenizer.modality != "action":
        raise ValueError(f"init_run={cfg.init_run!r} is a {init.tokenizer.modality} run; "
                         f"episode-return tuning plays an action run in its environment")
    target = cfg.target_return if cfg.target_return is not None else \
        init.meta["action"].get("target_return")
    tuner = EpisodeTuner(init, optimizer=instantiate(cfg.optim.optimizer),
                         scheduler=instantiate(cfg.optim.scheduler),
                         episodes_per_step=cfg.episodes_per_step, temperature=cfg.temperature,
                         kl_weight=cfg.kl_weight, target_return=target, seed=cfg.seed)

    def held_out(model) -> dict[str, float]:
        score = evaluate_run(dataclasses.replace(init, model=model), episodes=cfg.eval.episodes,
                             first_seed=cfg.eval.first_seed, target_return=target,
                             baselines=False).scores[0]
        return {"return": score.mean, "return_std": score.std}

    # Manual optimization clips its own gradients (max_grad_norm); Lightning refuses both.
    return tune_and_save(cfg, init, tuner, run_dir, held_out, start,
                         use=f"  play it        armodal eval run={run_dir}",
                         gradient_clip_val=None)
