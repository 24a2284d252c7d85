"""Sequence-level fine-tuning (REINFORCE + leave-one-out baseline + KL to the start): the
rewards, the advantages, the gradient's sign on a toy reward, and a run end to end."""

from __future__ import annotations

import json

import pytest
import torch

from armodal.checkpoint import load_run
from armodal.cli import RECIPES_DIR, compose_config
from armodal.reinforce import (
    SequenceTuner,
    leave_one_out_advantages,
    sample_rollouts,
    token_logprobs,
)
from armodal.rewards import PythonParses, RepetitionPenalty, Sample
from armodal.train import train


def sample(text: str, prompt: str = "def ", finished: bool = True, tokens=()) -> Sample:
    return Sample(prompt=prompt, text=text, tokens=list(tokens), finished=finished)


def test_python_parses_judges_whole_lines_of_a_cut_snippet():
    reward = PythonParses()
    assert reward([sample("f(x):\n    return x\n")]) == [1.0]
    assert reward([sample("f(x:\n    return x\n")]) == [0.0]  # unbalanced
    # cut off by the length limit mid-line: judged on its whole lines only
    assert reward([sample("f(x):\n    return x\nprint(", finished=False)]) == [1.0]
    assert reward([sample("f(x):\n    return x\nprint(", finished=True)]) == [0.0]
    assert reward([sample("", prompt="")]) == [0.0]  # nothing written is no code
    assert reward([sample("x = '\\0'\n", prompt="")]) == [1.0]
    assert reward([sample("x = \0\n", prompt="")]) == [0.0]  # a NUL byte: ValueError, caught


def test_python_parses_wants_the_prompt_kept():
    """A tuned model gamed the bare parse check: prompt "def", continuation "_name # ...":
    valid Python (a name), no function. The snippet must begin with the prompt's tokens."""
    reward = PythonParses()
    assert reward([sample("_name\n# a comment\n", prompt="def")]) == [0.0]
    assert reward([sample(" f(x):\n    return x\n", prompt="def")]) == [1.0]
    assert reward([sample("y = 1\n", prompt="x =")]) == [1.0]  # x = y = 1
    assert reward([sample("pass\n", prompt="")]) == [1.0]  # nothing to keep


def test_repetition_penalty_counts_repeated_ngrams():
    penalty = RepetitionPenalty(2)
    assert penalty([sample("", tokens=[1, 2, 3, 4, 5])]) == [0.0]
    assert penalty([sample("", tokens=[1, 2, 1, 2, 1, 2])]) == [pytest.approx(-3 / 5)]
    assert RepetitionPenalty(1)([sample("", tokens=[7, 7, 7, 7])]) == [pytest.approx(-3 / 4)]
    assert RepetitionPenalty(4)([sample("", tokens=[1, 2])]) == [0.0]  # no 4-gram at all
    with pytest.raises(ValueError, match="n=0"):
        RepetitionPenalty(0)


def test_leave_one_out_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 2.0, 2.0, 2.0], dtype=torch.float64)
    adv = leave_one_out_advantages(rewards, groups=2)  # prompts of 3 samples each
    assert adv.tolist() == pytest.approx([1.0, -0.5, -0.5, 0.0, 0.0, 0.0])


class CountLetter:
    """Toy reward: how often `letter` occurs in the continuation."""

    def __init__(self, letter: str):
        self.letter = letter

    def __call__(self, samples):
        return [float(s.text.count(self.letter)) for s in samples]


def letter_logprob(model, run, letter: str) -> float:
    """log p(letter | bos) under `model`."""
    from armodal.textgen import encode_prompt

    ids = torch.tensor([encode_prompt(run.tokenizer, run.space, "") + encode_prompt(
        run.tokenizer, run.space, letter)[1:]])
    with torch.no_grad():
        return token_logprobs(model.eval(), ids, 1.0)[0, 0].item()


def test_the_gradient_follows_the_reward(char_run):
    """REINFORCE's sign: rewarding the letter 'e' makes 'e' likelier, rewarding its absence
    (the negated reward) makes it less likely; at the start the KL term is exactly 0."""
    moved = {}
    for sign in (1.0, -1.0):
        run = load_run(char_run.run_dir)
        tuner = SequenceTuner(run, [""], {"e": CountLetter("e")}, {"e": sign},
                              optimizer=lambda p: torch.optim.SGD(p, lr=0.05),
                              samples_per_prompt=16, prompts_per_step=1, max_new_tokens=12,
                              kl_weight=0.0, seed=3)
        start = letter_logprob(tuner.model, run, "e")
        optimizer = tuner.optimizer_factory(list(tuner.model.parameters()))
        tuner.log_dict = lambda *a, **k: None  # outside a Trainer
        for step in range(5):
            loss = tuner.training_step(torch.tensor(step), step)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        moved[sign] = letter_logprob(tuner.model, run, "e") - start
    assert moved[1.0] > 0 > moved[-1.0], moved


def test_kl_is_zero_at_the_start_and_positive_after_moving(char_run):
    run = load_run(char_run.run_dir)
    rollouts = sample_rollouts(run.model, run, ["de"], 4, 10, 1.0, seed=0)
    tokens, mask = rollouts.tokens, rollouts.mask
    tuner = SequenceTuner(run, ["de"], {"e": CountLetter("e")}, {},
                          optimizer=lambda p: torch.optim.SGD(p, lr=0.0), kl_weight=1.0)
    logp = token_logprobs(tuner.model, tokens, 1.0)
    ref = token_logprobs(tuner.reference, tokens, 1.0)
    assert torch.equal(logp[mask], ref[mask])
    with torch.no_grad():
        tuner.model.head.weight.add_(0.05 * torch.randn_like(tuner.model.head.weight))
    ratio = (token_logprobs(tuner.reference, tokens, 1.0) - token_logprobs(tuner.model, tokens,
                                                                           1.0))[mask]
    assert ((ratio.exp() - ratio - 1) > 0).all()
    # the reference is frozen and off the module tree
    assert not any(p.requires_grad for p in tuner.reference.parameters())
    assert all(not name.startswith("reference") for name, _ in tuner.named_parameters())


def test_rollouts_mask_exactly_the_sampled_tokens(char_run):
    run = load_run(char_run.run_dir)
    rollouts = sample_rollouts(run.model, run, ["ab", "abcd"], 3, 8, 1.0, seed=1)
    assert rollouts.tokens.shape[0] == 6 and rollouts.groups == 2
    for r, s in enumerate(rollouts.samples):
        prompt_len = 1 + len(s.prompt)  # bos + one id per character
        row = rollouts.tokens[r]
        sampled = row[1:][rollouts.mask[r]]  # targets marked as sampled
        expected = s.tokens + ([run.space.eos_id] if s.finished else [])
        assert sampled.tolist() == expected
        assert not rollouts.mask[r, :prompt_len - 1].any()


def test_sequence_tuning_end_to_end(char_run, tmp_path):
    run_dir = tmp_path / "tuned"
    cfg = compose_config(RECIPES_DIR, "text_code_rl", [
        f"init_run={char_run.run_dir}", f"run_dir={run_dir}", "trainer.max_steps=3",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "max_new_tokens=16", "samples_per_prompt=2", "eval.samples=2", "eval.val_batches=1",
        "prompts=[de,cl]"])
    result = train(cfg)
    assert result.steps == 3
    tuned = load_run(run_dir)
    meta = json.loads((run_dir / "config.json").read_text())["sequence_tuning"]
    assert set(meta["before"]) == {"parses", "repetition", "val_loss", "val_ppl"}
    assert meta["init_run"] == str(load_run(char_run.run_dir).path)
    assert tuned.tokenizer.config() == load_run(char_run.run_dir).tokenizer.config()
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/reward_parses" in metrics and "train/kl" in metrics


def test_a_stopped_tuning_run_resumes_exactly(char_run, tmp_path, monkeypatch):
    """SIGTERM at step 3 of 6 (the stop saves last.ckpt), then resume=auto: the tuned weights
    equal an uninterrupted run's bit for bit, since each step's samples are seeded by the step."""
    import os
    import signal

    from safetensors.torch import load_file

    from armodal.resume import RunStopped

    def config(run_dir, *extra):
        return compose_config(RECIPES_DIR, "text_code_rl", [
            f"init_run={char_run.run_dir}", f"run_dir={run_dir}", "trainer.max_steps=6",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "max_new_tokens=8", "samples_per_prompt=2", "eval.samples=2", "eval.val_batches=1",
            "prompts=[de,cl,th]", "optim.optimizer.lr=1e-3", "checkpoint_every=2", *extra])

    train(config(tmp_path / "whole"))
    real_step = SequenceTuner.training_step

    def stop_at_three(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # StopOnSignal saves after this step
        return real_step(self, batch, batch_idx)

    monkeypatch.setattr(SequenceTuner, "training_step", stop_at_three)
    with pytest.raises(RunStopped, match="SIGTERM at step 4"):
        train(config(tmp_path / "stopped"))
    monkeypatch.setattr(SequenceTuner, "training_step", real_step)
    assert train(config(tmp_path / "stopped", "resume=auto")).steps == 6
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    again = load_file(tmp_path / "stopped" / "model.safetensors")
    assert whole.keys() == again.keys()
    for name, tensor in whole.items():
        assert torch.equal(again[name], tensor), name
