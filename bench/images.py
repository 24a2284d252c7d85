"""Image domain figures: bits/dim against training wall-clock, and sampling speed.

    python bench/images.py digits
    python bench/images.py mnist --mnist ../shared/data/mnist
    python bench/images.py generate [--run <image_mnist_pixels run dir>]

digits: the `image_digits_pixels` recipe through the real training path (`train(cfg)`), exact
    bits/dim on the held-out 20% after every validation, against training seconds (validation
    and sampling excluded). Peer on the same split: a per-pixel independent model (one
    categorical over the 17 levels per pixel position and class-free, add-half smoothed,
    fitted on the train split) scored exactly.
mnist: the `image_mnist_pixels` recipe on the 9,000 / 1,000 split, the same way.
generate: 64 MNIST-sized images (784 pixel steps each, plus <eoi>) sampled with the KV cache,
    the issue's speed target. Peer in the same run: the same model without the cache (every
    step re-runs the whole sequence) on 8 images; the ratio is per image.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from armodal.callbacks import WallClock
from armodal.cli import RECIPES_DIR, compose_config
from armodal.data.image_module import ImageLayout, image_space
from armodal.data.images import DigitsImages, split_images
from armodal.generation import DecodingConfig
from armodal.imagegen import sample_images
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.image import PixelTokenizer
from armodal.train import train


def independent_pixel_bits(levels: int = 17, alpha: float = 0.5, seed: int = 1337) -> float:
    """Bits/dim of a per-pixel independent categorical model on the digits recipe's split."""
    train_set, val_set = split_images(DigitsImages().load(), 0.2, "random", seed)
    tok = PixelTokenizer(8, 1, levels)
    train_codes = tok.grid(train_set.images).reshape(len(train_set), -1)  # (N, 64)
    val_codes = tok.grid(val_set.images).reshape(len(val_set), -1)
    counts = torch.stack([torch.bincount(col, minlength=levels) for col in train_codes.T])
    logp = ((counts + alpha) / (counts + alpha).sum(1, keepdim=True)).log()  # (64, levels)
    nll = -logp[torch.arange(64), val_codes].sum()
    return float(nll / val_codes.numel() / math.log(2))


def run_recipe(recipe: str, overrides: list[str], workdir: str):
    """Train; (step, training seconds, bits/dim) per validation, and the result."""
    cfg = compose_config(RECIPES_DIR, recipe, [
        f"run_dir={workdir}/{recipe}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", *overrides])
    result = train(cfg)
    clock = next(c for c in result.trainer.callbacks if isinstance(c, WallClock))
    logged = result.module.bits_history
    history = [(step, seconds, logged[step]) for step, seconds in clock.history if step in logged]
    return history, result


def report_training(name: str, history, target: tuple[float, float]) -> None:
    seconds, bits = target
    for step, s, b in history:
        print(f"  step {step:5d}  {s:7.1f} s  {b:.4f} bits/dim")
    within = [b for _, s, b in history if s <= seconds]
    first = next((s for _, s, b in history if b <= bits), None)
    final_step, final_s, final_b = history[-1]
    print(f"figure {name}_bits_per_dim: {final_b:.4f} bits/dim after {final_s:.0f} s "
          f"({final_step} steps)")
    print(f"figure {name}_bits_per_dim_within_{seconds:.0f}s: "
          f"{min(within):.4f} bits/dim" if within else f"figure {name}: n/a")
    print(f"figure {name}_seconds_to_{bits}: " + (f"{first:.0f} s" if first else "not reached"))


def bench_generate(run: str | None, images: int = 64, peer_images: int = 8) -> None:
    if run:
        from armodal.checkpoint import load_run

        loaded = load_run(run)
        model, tok = loaded.model, loaded.tokenizer
        layout = ImageLayout.for_run(loaded.space, loaded.meta)
    else:  # the recipe's model size with random weights: speed does not depend on them
        tok = PixelTokenizer(28, 1, 256)
        classes = [str(i) for i in range(10)]
        layout = ImageLayout(image_space(tok, classes), True, classes)
        torch.manual_seed(0)
        model = Transformer(ModelConfig(vocab_size=layout.space.vocab_size, n_layer=4, n_head=4,
                                        n_kv_head=4, d_model=128, max_seq_len=787)).eval()
    labels = [i % 10 for i in range(images)]
    sample = DecodingConfig(strategy="sample", temperature=1.0, seed=0)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = sample_images(model, tok, layout, labels, sample)
        times.append(time.perf_counter() - start)
    assert out.shape[0] == images
    start = time.perf_counter()
    sample_images(model, tok, layout, labels[:peer_images],
                  DecodingConfig(strategy="sample", seed=0, use_cache=False))
    peer = time.perf_counter() - start
    cached = statistics.median(times)
    print(f"figure generate_{images}_mnist_images: {cached:.1f} s (runs {times}) | peer no KV "
          f"cache, {peer_images} images {peer:.1f} s | ratio per image "
          f"{peer / peer_images / (cached / images):.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["digits", "mnist", "generate"])
    parser.add_argument("--mnist", help="folder with the MNIST IDX files")
    parser.add_argument("--run", help="a trained image_mnist_pixels run, for `generate`")
    parser.add_argument("--runs", default="runs/bench", help="where runs are written")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs under --runs")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides, key=value")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.what == "generate":
        bench_generate(args.run)
        return
    Path(args.runs).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.runs) as tmp:
        tmp = args.runs if args.keep else tmp
        if args.what == "digits":
            baseline = independent_pixel_bits()
            history, _ = run_recipe("image_digits_pixels", args.overrides, tmp)
            report_training("digits", history, (300.0, 1.7))
            print(f"figure digits_independent_pixels: {baseline:.4f} bits/dim (same split)")
        else:
            if not args.mnist:
                sys.exit("mnist needs --mnist <folder with the IDX files>")
            history, _ = run_recipe("image_mnist_pixels",
                                    [f"domain.images.root={args.mnist}", *args.overrides], tmp)
            report_training("mnist", history, (1200.0, 1.2))


if __name__ == "__main__":
    main()
