"""Fine-tuning an action run on its episode return: the recorded decisions are the ones the
policy sampled (contexts across slides, masks, temperature), the gradient raises the
advantage-weighted log-likelihood, and a run goes end to end through `armodal train`."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from armodal.checkpoint import load_run
from armodal.cli import RECIPES_DIR, compose_config
from armodal.control.policy import SequencePolicy
from armodal.control.tuning import (
    decision_logprobs,
    play_and_record,
    returns_advantages,
    sampling_policy,
)
from armodal.train import train


@pytest.fixture(scope="module")
def cartpole_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cartpole")
    cfg = compose_config(RECIPES_DIR, "actions_cartpole", [
        "model=tiny", "trainer.max_steps=12", "trainer.val_check_interval=12",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "domain.episodes.n_episodes=14", f"domain.episodes.cache_dir={tmp / 'episodes'}",
        "domain.data.batch_size=8", "domain.data.context=4", f"run_dir={tmp / 'run'}",
        "optim.scheduler.warmup_steps=2", "sample_every_validation=false"])
    return train(cfg).run_dir


def test_returns_advantages_leave_one_out():
    adv = returns_advantages(torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))
    spread = torch.tensor([10.0, 20.0, 30.0]).std().item() + 1.0
    assert adv.tolist() == pytest.approx([-15 / spread, 0.0, 15 / spread])


def test_recorded_decisions_are_what_the_policy_sampled(cartpole_run, monkeypatch):
    """Recomputed from the recorded contexts, each chosen token's log-probability equals the
    one of the distribution the policy sampled from at that step (context 4 timesteps, so the
    episodes slide their cache several times)."""
    run = load_run(cartpole_run)
    seen = []
    real_act = SequencePolicy.act

    def act(self):
        actions = real_act(self)
        seen.append(self.last_logits.clone())  # (B, V) before the mask and temperature
        return actions

    monkeypatch.setattr(SequencePolicy, "act", act)
    policy = sampling_policy(run.model, run, 0.7, seeds=[1, 2, 3])
    decisions = play_and_record(policy, "CartPole-v1", [1, 2, 3], 60.0)
    assert decisions.steps > 3 * 8  # long enough to slide (4-step context)
    got = decision_logprobs(run.model, decisions, torch.arange(len(decisions.tokens)),
                            policy.masks, 0.7)
    # Rebuild what was sampled: live rows in order, one decision per row and step.
    expected, i = [], 0
    alive_counts = torch.bincount(decisions.episode, minlength=3).tolist()
    for step, logits in enumerate(seen):
        for row in range(3):
            if step < alive_counts[row]:
                masked = (logits[row] / 0.7).masked_fill(~policy.masks[0], -math.inf)
                expected.append(F.log_softmax(masked, -1)[decisions.tokens[i]].item())
                assert decisions.episode[i] == row
                i += 1
    assert i == len(decisions.tokens)
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-4, rtol=0)


def test_the_update_raises_the_advantage_weighted_likelihood(cartpole_run):
    """REINFORCE's sign on real episodes: one small SGD step on -sum_i A_i log p(episode i)
    raises sum_i A_i log p(episode i) for the same decisions."""
    run = load_run(cartpole_run)
    model = run.model.train().requires_grad_(True)
    policy = sampling_policy(model, run, 1.0, seeds=[5, 6, 7, 8])
    decisions = play_and_record(policy, "CartPole-v1", [5, 6, 7, 8], 60.0)
    advantages = returns_advantages(decisions.returns)
    assert advantages.abs().sum() > 0  # the episodes differ in return
    index = torch.arange(len(decisions.tokens))

    def objective() -> torch.Tensor:
        logp = decision_logprobs(model, decisions, index, policy.masks, 1.0)
        return (advantages[decisions.episode] * logp).sum()

    before = objective()
    (-before).backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 1e-3 * p.grad
    assert objective().item() > before.item()


def test_episode_tuning_end_to_end(cartpole_run, tmp_path):
    run_dir = tmp_path / "tuned"
    result = train(compose_config(RECIPES_DIR, "actions_rl", [
        f"init_run={cartpole_run}", f"run_dir={run_dir}", "trainer.max_steps=2",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "episodes_per_step=3", "eval.episodes=2"]))
    assert result.steps == 2
    meta = json.loads((run_dir / "config.json").read_text())["sequence_tuning"]
    assert set(meta["before"]) == {"return", "return_std"} and meta["steps"] == 2
    assert load_run(run_dir).meta["action"]["env_id"] == "CartPole-v1"
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/return" in metrics and "train/kl" in metrics


def test_episode_tuning_refuses_a_text_run(char_run, tmp_path):
    with pytest.raises(ValueError, match="episode-return tuning plays an action run"):
        train(compose_config(RECIPES_DIR, "actions_rl", [f"init_run={char_run.run_dir}",
                                                          f"run_dir={tmp_path / 'x'}"]))
