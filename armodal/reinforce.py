"""Sequence-level fine-tuning of a trained text run: REINFORCE with a leave-one-out baseline
and a KL penalty to the starting model.

Each step samples `samples_per_prompt` continuations of `prompts_per_step` prompts with the
current model (plain sampling at `temperature`, so the log-probabilities below are those of
the distribution the samples came from), scores each with the configured rewards, and follows

    loss = -mean_i[(R_i - b_i) * sum_t log p(x_t)] + kl_weight * mean_t[KL_t]

where b_i is the mean reward of the other samples of the same prompt (RLOO: unbiased, and it
needs no value network) and KL_t is the k3 estimator exp(q - p) - (q - p) - 1 of KL(p || q)
between the policy p and the frozen starting model q at each sampled token (non-negative, low
variance; the penalty keeps the tuned model's perplexity close to the start's).
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader

from armodal.checkpoint import LoadedRun, load_run, save_run
from armodal.generation import DecodingConfig, generate
from armodal.loggers import finish_runs
from armodal.resume import AtomicCheckpointIO, fit_resumable
from armodal.rewards import Reward, Sample
from armodal.textgen import decode_text, encode_prompt

__all__ = ["SequenceTuner", "score_samples", "train_sequence_level"]


@dataclass
class Rollouts:
    """Sampled continuations of a batch of prompts, padded into one training tensor."""

    tokens: Tensor  # (B, L) prompt + continuation, right-padded with pad
    mask: Tensor  # (B, L - 1) bool: target j is a sampled token (the continuation)
    samples: list[Sample]
    groups: int  # rows are `groups` blocks of samples_per_prompt rows, one block per prompt


def sample_rollouts(model: torch.nn.Module, run: LoadedRun, prompts: list[str], k: int,
                    max_new_tokens: int, temperature: float, seed: int) -> Rollouts:
    """k sampled continuations of each prompt (prompt order, k rows each), eos-terminated."""
    space = run.space
    ids = [encode_prompt(run.tokenizer, space, p) for p in prompts]
    room = model.config.max_seq_len - max(len(i) for i in ids)
    config = DecodingConfig(strategy="sample", temperature=temperature, seed=seed,
                            max_new_tokens=min(max_new_tokens, room), num_return_sequences=k,
                            stop_token_ids=(space.eos_id,))
    was_training = model.training
    model.eval()  # sampling without dropout: the distribution the policy gradient refers to
    out = generate(model, ids, config)
    model.train(was_training)
    rows = [out.prompts[r] + out.sequences[r] for r in range(len(out.sequences))]
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), space.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool)
    samples = []
    for r, row in enumerate(rows):
        tokens[r, :len(row)] = torch.tensor(row)
        start = len(out.prompts[r])
        mask[r, start - 1:len(row) - 1] = True  # target j predicts tokens[j + 1]
        finished = out.finish_reasons[r] == "stop_token"
        new = out.sequences[r][:-1] if finished else out.sequences[r]
        samples.append(Sample(prompt=prompts[r // k], text=decode_text(run.tokenizer, space, new),
                              tokens=new, finished=finished))
    return Rollouts(tokens, mask, samples, len(prompts))


def token_logprobs(model: torch.nn.Module, tokens: Tensor, temperature: float) -> Tensor:
    """log p(tokens[:, j + 1] | tokens[:, :j + 1]) (B, L - 1) at the sampling temperature."""
    logits = model(tokens[:, :-1]).float() / temperature  # (B, L-1, V)
    return torch.gather(F.log_softmax(logits, -1), 2, tokens[:, 1:, None]).squeeze(2)


def leave_one_out_advantages(rewards: Tensor, groups: int) -> Tensor:
    """R_i minus the mean reward of the other samples of its prompt; rewards (B,), B = groups*k."""
    r = rewards.view(groups, -1)  # (G, k)
    k = r.shape[1]
    baseline = (r.sum(1, keepdim=True) - r) / (k - 1)
    return (r - baseline).flatten()


def combine_rewards(rewards: dict[str, Reward], weights: dict[str, float],
                    samples: list[Sample]) -> tuple[Tensor, dict[str, float]]:
    """The weighted sum (B,) and each term's mean, for logging."""
    total = torch.zeros(len(samples), dtype=torch.float64)
    means = {}
    for name, reward in rewards.items():
        values = torch.tensor(reward(samples), dtype=torch.float64)
        total += weights.get(name, 1.0) * values
        means[name] = values.mean().item()
    return total, means


class SequenceTuner(L.LightningModule):
    """REINFORCE on a copy of `run.model`; `run.model` itself stays the frozen reference."""

    def __init__(self, run: LoadedRun, prompts: list[str], rewards: dict[str, Reward],
                 reward_weights: dict[str, float], optimizer, scheduler=None,
                 samples_per_prompt: int = 8, prompts_per_step: int = 2,
                 max_new_tokens: int = 96, temperature: float = 1.0, kl_weight: float = 0.05,
                 seed: int = 0):
        super().__init__()
        if samples_per_prompt < 2:
            raise ValueError(f"samples_per_prompt={samples_per_prompt}; the leave-one-out "
                             f"baseline needs at least 2 samples of each prompt")
        if not prompts:
            raise ValueError("prompts is empty; give the texts to sample continuations of")
        if not temperature > 0 or kl_weight < 0:
            raise ValueError(f"temperature={temperature}, kl_weight={kl_weight}; expected "
                             f"temperature > 0 and kl_weight >= 0")
        unknown = set(reward_weights) - set(rewards)
        if unknown:
            raise ValueError(f"reward_weights name {sorted(unknown)}, which are not among the "
                             f"rewards {sorted(rewards)}")
        self.run = run
        self.model = copy.deepcopy(run.model).train().requires_grad_(True)
        # The reference is kept off the module tree: frozen, and not saved a second time.
        object.__setattr__(self, "reference", run.model.eval().requires_grad_(False))
        self.prompts, self.rewards, self.reward_weights = prompts, rewards, reward_weights
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.k, self.per_step = samples_per_prompt, prompts_per_step
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.kl_weight, self.seed = kl_weight, seed

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        # The step, not the batch, picks the prompts and seeds the samples: a resumed run
        # (global_step restored from the checkpoint) draws what the uninterrupted one would.
        step = self.global_step
        chosen = random.Random(self.seed * 1_000_003 + step).sample(
            self.prompts, min(self.per_step, len(self.prompts)))
        rollouts = sample_rollouts(self.model, self.run, chosen, self.k, self.max_new_tokens,
                                   self.temperature, seed=self.seed * 1_000_003 + step)
        rewards, terms = combine_rewards(self.rewards, self.reward_weights, rollouts.samples)
        advantages = leave_one_out_advantages(rewards, rollouts.groups).float()  # (B,)
        tokens, mask = rollouts.tokens.to(self.device), rollouts.mask.to(self.device)
        logp = token_logprobs(self.model, tokens, self.temperature)  # (B, L-1)
        with torch.no_grad():
            ref_logp = token_logprobs(self.reference, tokens, self.temperature)
        policy_loss = -(advantages.to(self.device) * (logp * mask).sum(1)).mean()
        log_ratio = (ref_logp - logp) * mask  # log q/p at sampled tokens
        kl = ((log_ratio.exp() - log_ratio - 1) * mask).sum() / mask.sum().clamp(min=1)
        loss = policy_loss + self.kl_weight * kl
        self.log_dict({"train/loss": loss, "train/reward": rewards.mean().item(),
                       "train/kl": kl, "train/length": mask.sum(1).float().mean(),
                       **{f"train/reward_{n}": v for n, v in terms.items()}}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.model.parameters()])
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class Steps(torch.utils.data.Dataset):
    """One placeholder item per step: each step draws its own prompts and samples from them
    (training_step), so there is no data to load."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Tensor:
        return torch.tensor(i)


@torch.no_grad()
def score_samples(model: torch.nn.Module, run: LoadedRun, prompts: list[str],
                  rewards: dict[str, Reward], samples: int, max_new_tokens: int,
                  temperature: float, seed: int) -> dict[str, float]:
    """Each reward term's mean over `samples` continuations per prompt (seeded: the same
    call on two models samples with the same random numbers)."""
    per_prompt = []
    for i, prompt in enumerate(prompts):
        rollouts = sample_rollouts(model, run, [prompt], samples, max_new_tokens, temperature,
                                   seed + i)
        per_prompt.append(combine_rewards(rewards, {}, rollouts.samples)[1])
    return {name: sum(p[name] for p in per_prompt) / len(per_prompt) for name in rewards}


def train_sequence_level(cfg: DictConfig):
    """Load cfg.init_run, fine-tune it with REINFORCE, score before / after, save a run."""
    from armodal.evaluate import mean_nll, val_split_tokens
    from armodal.train import start_run

    start = time.perf_counter()
    run_dir = start_run(cfg)
    init = load_run(cfg.init_run)
    if init.tokenizer.modality != "text":
        raise ValueError(f"init_run={cfg.init_run!r} is a {init.tokenizer.modality} run; "
                         f"sequence-level fine-tuning samples text continuations")
    rewards = {name: instantiate(node) for name, node in cfg.rewards.items()}
    weights = OmegaConf.to_container(cfg.reward_weights) if cfg.reward_weights else {}
    prompts = list(cfg.prompts)
    tuner = SequenceTuner(init, prompts, rewards, weights,
                          optimizer=instantiate(cfg.optim.optimizer),
                          scheduler=instantiate(cfg.optim.scheduler),
                          samples_per_prompt=cfg.samples_per_prompt,
                          prompts_per_step=cfg.prompts_per_step,
                          max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                          kl_weight=cfg.kl_weight, seed=cfg.seed)

    val_tokens = torch.from_numpy(val_split_tokens(init)[0].astype("int64"))  # read once

    def held_out(model) -> dict[str, float]:
        scores = score_samples(model, init, prompts, rewards, cfg.eval.samples,
                               cfg.max_new_tokens, cfg.temperature, cfg.eval.seed)
        nll = mean_nll(model.eval(), val_tokens, model.config.max_seq_len, 16,
                       cfg.eval.val_batches)
        return {**scores, "val_loss": nll, "val_ppl": math.exp(nll)}

    return tune_and_save(cfg, init, tuner, run_dir, held_out, start)


def tune_and_save(cfg: DictConfig, init: LoadedRun, tuner: L.LightningModule, run_dir: Path,
                  held_out, start: float, use: str | None = None,
                  **trainer_kwargs) -> SequenceTuningResult:
    """What text and episode tuning share: score the start with `held_out(model)`, fit
    `tuner` (its `model` a copy of init.model) one placeholder batch per step, resumably,
    score the result, save it as a run dir like the start's, print the summary."""
    before = held_out(init.model)
    loggers = [instantiate(c) for c in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                     default_root_dir=str(run_dir), limit_val_batches=0,
                                     plugins=[AtomicCheckpointIO()], **trainer_kwargs)
    steps = DataLoader(Steps(cfg.trainer.max_steps), batch_size=None)
    # Lightning warns that this loader cannot resume mid-epoch; it has nothing to resume (the
    # step number picks each step's samples and seeds).
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")
    fit_resumable(trainer, tuner, run_dir, cfg.resume, train_dataloaders=steps)
    after = held_out(tuner.model)
    save_run(run_dir, tuner.model.eval(), init.space, init.tokenizer, extra={
        **{k: v for k, v in init.meta.items() if k not in ("model", "space", "tokenizer")},
        "sequence_tuning": {"init_run": str(init.path), "before": before, "after": after,
                            "steps": trainer.global_step,
                            "config": OmegaConf.to_container(cfg, resolve=True)},
    })
    finish_runs(loggers)
    print(summary(run_dir, before, after, trainer.global_step, time.perf_counter() - start,
                  use))
    return SequenceTuningResult(Path(run_dir), before, after, trainer.global_step, tuner)


@dataclass
class SequenceTuningResult:
    run_dir: Path
    before: dict[str, float]  # held-out figures of the starting model
    after: dict[str, float]  # and of the tuned one, same samples' seeds, same val split
    steps: int
    tuner: SequenceTuner


def summary(run_dir: Path, before: dict, after: dict, steps: int, seconds: float,
            use: str | None = None) -> str:
    """The end-of-run block; `use` is how to use the result (default: generate text)."""
    rows = [f"  {name:<14} {before[name]:>10.4f} {after[name]:>10.4f}" for name in before]
    use = use or f"  generate       armodal generate run={run_dir} prompt=\"...\""
    return "\n".join(["", "=" * 72, f"sequence-level fine-tuning: {steps} steps, {seconds:.0f} s",
                      f"  run dir        {run_dir}",
                      f"  {'held out':<14} {'before':>10} {'after':>10}", *rows, use, "=" * 72])
