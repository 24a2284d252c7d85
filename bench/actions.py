"""Action domain figures: the closed-loop control loop's speed, against the scripted expert
playing the same seeds through the same loop (the environment-only ceiling).

    python bench/actions.py --run <actions_cartpole or actions_pendulum run dir>

Each policy plays `--episodes` seeded episodes at batch 1 (one environment) and at
`--batch` environments in lockstep; the figure is environment steps per second of the whole loop
(tokenize the observation, one cached forward, decode the action, step the environment). The
median of `--repeats` runs is reported.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from armodal.checkpoint import load_run
from armodal.control.evaluate import Stateless, play
from armodal.control.experts import scripted_expert
from armodal.control.policy import SequencePolicy


def median_rate(agent, env_id: str, seeds: list[int], batch: int, target, repeats: int) -> float:
    rates = [play(agent, env_id, seeds, batch, "bench", target).steps_per_second
             for _ in range(repeats)]
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--episodes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--first-seed", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)  # batch 1 is latency-bound: more threads only add overhead
    run = load_run(args.run)
    info = run.meta["action"]
    env_id = info["env_id"]
    target = info["target_return"] if run.tokenizer.has_returns else None
    policy = SequencePolicy(run.model, run.tokenizer, info["context"])
    expert = Stateless(scripted_expert(env_id))
    name = env_id.split("-")[0].lower()
    for batch in (1, args.batch):
        seeds = list(range(args.first_seed, args.first_seed + args.episodes * batch))
        model_rate = median_rate(policy, env_id, seeds, batch, target, args.repeats)
        expert_rate = median_rate(expert, env_id, seeds, batch, None, args.repeats)
        print(f"figure control_steps_per_second_{name}_b{batch}: {model_rate:.0f} steps/s | "
              f"peer scripted expert {expert_rate:.0f} steps/s | "
              f"ratio {model_rate / expert_rate:.3f}x")


if __name__ == "__main__":
    main()
