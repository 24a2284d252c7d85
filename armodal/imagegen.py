"""Images out of a trained image run: class-conditional sampling with guidance, completion of
the top rows, PNG grids. What `armodal generate` does for image runs, as plain functions."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from armodal.data.image_module import ImageDataModule, ImageLayout
from armodal.generation import DecodingConfig, generate

__all__ = ["completion_prefix", "generate_grid", "image_step_masks", "sample_images",
           "save_grid"]


def image_step_masks(layout: ImageLayout, tokenizer: Any, start: int = 0) -> Tensor:
    """(S, V) bool: from stream position `start` on, each step allows exactly what the image
    layout puts there (any code, or the forced end-of-row / size token), then <eoi>."""
    space = layout.space
    lo, n_codes = space.offset("image"), tokenizer.layout.n_codes
    steps = tokenizer.layout.steps()[start:]
    masks = torch.zeros(len(steps) + 1, space.vocab_size, dtype=torch.bool)
    for s, forced in enumerate(steps):
        if forced is None:
            masks[s, lo:lo + n_codes] = True
        else:
            masks[s, lo + forced] = True
    masks[-1, space.special_ids["<eoi>"]] = True
    return masks


def sample_images(model: nn.Module, tokenizer: Any, layout: ImageLayout,
                  labels: list[int | None], decoding: DecodingConfig,
                  prefix_codes: Tensor | None = None, progress: bool = False) -> Tensor:
    """(N, C, H, W) uint8 images, one per entry of `labels` (None: unconditional).

    prefix_codes: (N, P) local ids of each image's stream to keep (image completion: the first
    rows); generation continues from there. decoding.cfg_scale != 1 guides each row against
    the same prompt with the null class. Exactly the image layout comes out, whatever the
    model's weights, because every step is masked to what the layout allows there.
    """
    n = len(labels)
    if n == 0:
        raise ValueError("no images requested; ask for at least one")
    kept = 0 if prefix_codes is None else prefix_codes.shape[1]
    if prefix_codes is not None and len(prefix_codes) != n:
        raise ValueError(f"prefix_codes has {len(prefix_codes)} rows for {n} images")
    masks = image_step_masks(layout, tokenizer, start=kept)
    codes = [[] for _ in labels] if prefix_codes is None else \
        (prefix_codes + layout.space.offset("image")).tolist()
    prompts = [layout.prefix(y) + c for y, c in zip(labels, codes)]
    uncond = None
    if decoding.cfg_scale != 1.0:
        if not layout.conditional:
            raise ValueError(f"decoding.cfg_scale={decoding.cfg_scale} needs a class-conditional "
                             f"model; this run is unconditional (use cfg_scale=1)")
        uncond = [layout.prefix(None) + c for c in codes]
    config = dataclasses.replace(decoding, max_new_tokens=len(masks), min_new_tokens=0,
                                 num_return_sequences=1)
    bar = _progress(len(masks), n) if progress else None
    try:
        out = generate(model, prompts, config, step_masks=masks, uncond_prompts=uncond,
                       on_token=(lambda row, _: bar.update(1) if row == 0 else None)
                       if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    lo = layout.space.offset("image")
    streams = [torch.tensor(c + seq[:-1]) for c, seq in zip(codes, out.sequences)]
    return torch.stack([tokenizer.decode(s - lo) for s in streams])


def _progress(steps: int, n: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"generating {n} image{'s' * (n != 1)}", unit="step")


def save_grid(images: Tensor, path: str | Path, nrow: int, min_side: int = 64) -> Path:
    """Write (N, C, H, W) uint8 images as one PNG grid of `nrow` images per row, each scaled up
    (nearest neighbour) to at least `min_side` pixels so small images stay readable."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, -(-min_side // images.shape[-1]))
    big = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    tmp = path.with_name(path.stem + ".tmp.png")
    save_image(big.float() / 255, tmp, nrow=nrow, padding=2, pad_value=0.5)
    tmp.replace(path)
    return path


def mask_below(images: Tensor, tokenizer: Any, keep_rows: int) -> Tensor:
    """The images with everything below the kept grid rows greyed out (what the model saw)."""
    pixel_rows = keep_rows * images.shape[-2] // tokenizer.layout.height
    shown = images.clone()
    shown[..., pixel_rows:, :] = 128
    return shown


def completion_prefix(tokenizer: Any, images: Tensor, keep_rows: int) -> Tensor:
    """(N, P) local ids: the stream up to and including the first `keep_rows` grid rows."""
    grid = tokenizer.layout
    if not 0 < keep_rows < grid.height:
        raise ValueError(f"keep_rows={keep_rows}: keep between 1 and {grid.height - 1} of the "
                         f"image's {grid.height} rows of codes")
    return tokenizer.encode_batch(images)[:, :grid.prefix_length(keep_rows)]


def requested_labels(layout: ImageLayout, classes: Any, per_class: int) -> list[int | None]:
    """Grid labels: `per_class` images of each requested class (one grid row per class), or
    `per_class` unconditional images for an unconditional run."""
    if per_class < 1:
        raise ValueError(f"num_images must be >= 1, got {per_class}")
    if not layout.conditional:
        if classes not in (None, "all"):
            raise ValueError(f"classes={classes!r} given, but this run is unconditional (it was "
                             f"trained without class tokens); leave classes unset")
        return [None] * per_class
    wanted = range(layout.null_label) if classes in (None, "all") else \
        ([classes] if isinstance(classes, int) else list(classes))
    for c in wanted:
        if isinstance(c, bool) or not isinstance(c, int):
            raise ValueError(f"classes must be 'all' or class ids, got {c!r}")
        layout.prefix(c)  # range check, naming the trained classes
    return [c for c in wanted for _ in range(per_class)]


def generate_grid(run: Any, decoding: DecodingConfig, classes: Any = "all", num_images: int = 8,
                  out: str | None = None, complete_rows: int | None = None,
                  progress: bool = True) -> tuple[Path, int]:
    """`armodal generate` on an image run: write a PNG grid, return (its path, images per row).

    Sampling: one grid row per requested class (conditional runs), `num_images` per row.
    complete_rows=k: the first `num_images` val images keep their top k rows of codes and the
    model draws the rest; grid rows are the originals, what the model saw, the completions.
    """
    layout = ImageLayout.for_run(run.space, run.meta)
    path = Path(out) if out else run.path / "generated" / (
        "completions.png" if complete_rows else "samples.png")
    if complete_rows is None:
        labels = requested_labels(layout, classes, num_images)
        images = sample_images(run.model, run.tokenizer, layout, labels, decoding,
                               progress=progress)
        return save_grid(images, path, nrow=num_images), num_images
    dm = ImageDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space)
    val = dm.val_images.subset(torch.arange(min(num_images, len(dm.val_images))))
    prefix = completion_prefix(run.tokenizer, val.images, complete_rows)
    labels = val.labels.tolist() if layout.conditional else [None] * len(val)
    done = sample_images(run.model, run.tokenizer, layout, labels, decoding, prefix,
                         progress=progress)
    grid = torch.cat([val.images, mask_below(val.images, run.tokenizer, complete_rows), done])
    return save_grid(grid, path, nrow=len(val)), len(val)
