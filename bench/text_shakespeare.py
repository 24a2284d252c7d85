"""Char-level tiny shakespeare: val loss against training wall-clock, armodal vs nanoGPT.

    python bench/text_shakespeare.py --data ../shared/data/tinyshakespeare/input.txt

Split: first 90% of characters train, last 10% val (nanoGPT's split). Val loss is exact: the
mean NLL over every non-overlapping 64-token window of the val split, for both sides.
armodal runs the `text_char_shakespeare` recipe twice through the real training path
(`train(cfg)`): a short schedule for the 67-second target and a long one for the 300-second
target. The peer is nanoGPT's model and loop with its CPU settings (bench/nanogpt_reference.py),
on the same tokens, in the same process. Training time excludes validation for both.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nanogpt_reference import train_reference  # noqa: E402

from armodal.callbacks import WallClock  # noqa: E402
from armodal.cli import RECIPES_DIR, compose_config  # noqa: E402
from armodal.evaluate import mean_nll  # noqa: E402
from armodal.train import train  # noqa: E402

TARGET_SHORT = (67.0, 1.886)  # seconds, val loss: nanoGPT's CPU figure reached in 134 s
TARGET_LONG = (300.0, 1.60)


def run_armodal(data: str, cache: str, steps: int, val_every: int, overrides: list[str]):
    """Train the recipe; (step, training seconds, val loss) per validation, and the result."""
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={data}", f"domain.data.cache_dir={cache}",
        "domain.data.val_batches=null", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={val_every}",
        f"run_dir={cache}/run-{steps}", "sample_every_validation=false",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "~callbacks.checkpoint", *overrides])
    result = train(cfg)
    clock = next(c for c in result.trainer.callbacks if isinstance(c, WallClock))
    losses = dict(result.module.val_history)
    history = [(step, seconds, losses[step]) for step, seconds in clock.history if step in losses]
    return history, clock, result


def first_reaching(history, loss: float) -> float | None:
    return next((seconds for _, seconds, val in history if val <= loss), None)


def loss_within(history, seconds: float) -> float | None:
    inside = [val for _, s, val in history if s <= seconds]
    return min(inside) if inside else None


def fmt(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x:.3f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="tiny shakespeare input.txt")
    parser.add_argument("--short-steps", type=int, default=500)
    parser.add_argument("--long-steps", type=int, default=2300)
    parser.add_argument("--val-every", type=int, default=100, help="steps between val losses")
    parser.add_argument("--no-peer", action="store_true", help="skip the nanoGPT run")
    parser.add_argument("--no-long", action="store_true", help="skip the 300 s run")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides for armodal's runs")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())

    with tempfile.TemporaryDirectory() as cache:
        short, clock, result = run_armodal(args.data, cache, args.short_steps, args.val_every,
                                           args.override)
        tokens_per_s = clock.tokens / clock.seconds
        runs = {"armodal short": short}
        if not args.no_long:
            runs["armodal long"] = run_armodal(args.data, cache, args.long_steps,
                                                     args.val_every, args.override)[0]
        if not args.no_peer:
            shards = result.datamodule.shards  # the very tokens armodal trained on
            val = torch.from_numpy(shards.val.astype("int64"))
            runs["nanoGPT"] = train_reference(
                shards.train, shards.space.vocab_size,
                evaluate=lambda m: mean_nll(m, val, seq_len=64, batch_size=256))

    print("\nval loss against training seconds")
    for name, history in runs.items():
        print(f"  {name}: " + ", ".join(f"{s:.0f}s:{v:.3f}" for _, s, v in history))

    (t_short, l_short), (t_long, l_long) = TARGET_SHORT, TARGET_LONG
    ours = runs["armodal short"]
    print(f"figure armodal_tokens_per_second: {tokens_per_s:.0f} tokens/s")
    print(f"figure val_loss_within_{t_short:.0f}s: {fmt(loss_within(ours, t_short))} nats"
          f" (target <= {l_short})")
    reach = first_reaching(ours, l_short)
    peer = runs.get("nanoGPT")
    if peer:
        peer_reach = first_reaching(peer, l_short)
        ratio = f"{peer_reach / reach:.2f}" if reach and peer_reach else "n/a"
        print(f"figure seconds_to_val_{l_short}: {fmt(reach, ' s')} | peer nanoGPT "
              f"{fmt(peer_reach, ' s')} | ratio {ratio}")
        peer_final_s, peer_final = peer[-1][1], peer[-1][2]
        ours_s = first_reaching(ours, peer_final)
        ratio = f"{peer_final_s / ours_s:.2f}" if ours_s else "n/a"
        print(f"figure seconds_to_nanogpt_final_loss_{peer_final:.3f}: {fmt(ours_s, ' s')} | "
              f"peer nanoGPT {peer_final_s:.1f} s | ratio {ratio}")
    else:
        print(f"figure seconds_to_val_{l_short}: {fmt(reach, ' s')}")
    if "armodal long" in runs:
        long = runs["armodal long"]
        print(f"figure val_loss_within_{t_long:.0f}s: {fmt(loss_within(long, t_long))} nats"
              f" (target <= {l_long})")
        print(f"figure seconds_to_val_{l_long}: {fmt(first_reaching(long, l_long), ' s')}")


if __name__ == "__main__":
    main()
