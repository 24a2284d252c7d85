"""Video out of a trained video run: continue clips frame by frame, measure where the digits
went, write an animated GIF and a frame-strip PNG. What `armodal generate` does for video runs,
as plain functions, and the sampling callback that training runs after each validation.

A clip is (F, C, H, W) uint8 frames; batches of clips are (N, F, C, H, W).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from armodal.data.video_module import VideoDataModule, VideoLayout
from armodal.generation import DecodingConfig, generate

__all__ = ["SampleVideo", "centre_of_mass", "clip_panels", "continuation_errors",
           "continue_clips", "generate_video_files", "read_frames", "save_gif", "save_strip"]

PROMPT_SHADE, NEW_SHADE = 64, 255  # frame borders: prompt / truth frames, generated frames
BAR_PROMPT = 170  # the GIF's time bar while the prompt plays (generated frames: NEW_SHADE)


def continue_clips(model: nn.Module, tokenizer: Any, layout: VideoLayout, prompt: Tensor,
                   new_frames: int, decoding: DecodingConfig, batch_size: int = 64,
                   progress: bool = False) -> Tensor:
    """(N, k, C, H, W) uint8 prompt frames -> (N, new_frames, C, H, W) uint8 continuations.

    Each prompt is <bos> and its k frames, tokenized one by one; every generated step is
    masked to the frame layout (<bof>, the codes, <eof>), so exactly `new_frames` frames come
    out whatever the model, all in one KV-cached decode per batch of clips.
    """
    n, k = prompt.shape[:2]
    if k < 1 or new_frames < 1:
        raise ValueError(f"continue_clips: need at least one prompt frame and one new frame, "
                         f"got {k} and {new_frames}")
    streams = tokenizer.encode_batch(prompt.flatten(0, 1)).reshape(n, k, -1)  # (N, k, S)
    prompts = layout.pack(streams)  # (N, P)
    masks = layout.frame_masks(new_frames)  # (new_frames * frame_len, V)
    context = model.config.max_seq_len
    if not model.config.sliding_window and prompts.shape[1] + len(masks) > context:
        room = (context - prompts.shape[1]) // layout.frame_len
        raise ValueError(f"{k} prompt frames + {new_frames} new frames do not fit the model's "
                         f"{context}-token context ({layout.frames} frames in training); ask "
                         f"for at most {room} new frames after {k}")
    config = dataclasses.replace(decoding, max_new_tokens=len(masks), min_new_tokens=0,
                                 num_return_sequences=1)
    bar = _progress(len(masks) * -(-n // batch_size), n) if progress else None
    sequences = []
    try:
        for chunk in prompts.split(batch_size):
            out = generate(model, chunk, config, step_masks=masks,
                           on_token=(lambda row, _: bar.update(1) if row == 0 else None)
                           if bar is not None else None)
            sequences += out.sequences
    finally:
        if bar is not None:
            bar.close()
    codes = torch.stack([layout.frame_streams(seq, new_frames) for seq in sequences])
    frames = [tokenizer.decode(c) for c in codes.flatten(0, 1)]  # each (C, H, W)
    return torch.stack(frames).reshape(n, new_frames, *frames[0].shape)


def _progress(steps: int, n: int):
    from tqdm.auto import tqdm

    return tqdm(total=steps, desc=f"continuing {n} clip{'s' * (n != 1)}", unit="step")


def centre_of_mass(frames: Tensor) -> Tensor:
    """(..., C, H, W) uint8 -> (..., 2) float: the intensity-weighted centre (row, col) in
    pixels; a blank frame counts as the frame's centre (a guess, not a free miss)."""
    x = frames.float().sum(-3)  # (..., H, W)
    h, w = x.shape[-2:]
    mass = x.sum((-2, -1))  # (...)
    rows = (x.sum(-1) * torch.arange(h)).sum(-1)  # (...)
    cols = (x.sum(-2) * torch.arange(w)).sum(-1)
    centre = torch.stack([rows, cols], -1) / mass.clamp_min(1e-9)[..., None]
    blank = torch.tensor([(h - 1) / 2, (w - 1) / 2])
    return torch.where((mass > 0)[..., None], centre, blank)


def continuation_errors(prompt: Tensor, generated: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Mean distance in pixels between each frame's centre of mass and the true continuation's,
    per new frame (F',): "model" (the generated frames) and three peers that only look at the
    prompt: "copy_last" (the last prompt frame, held), "constant_velocity" (the centre moved
    on by the last two prompt frames' step, kept inside the frame; no bounces) and
    "halfway_to_centre" (halfway from the last centre to the frame's: where a bouncing digit
    is on average, a guess that knows nothing of its motion)."""
    if generated.shape != truth.shape:
        raise ValueError(f"generated {tuple(generated.shape)} and truth {tuple(truth.shape)} "
                         f"differ in shape")
    target = centre_of_mass(truth)  # (N, F', 2)
    seen = centre_of_mass(prompt)  # (N, k, 2)
    last = seen[:, -1:]  # (N, 1, 2)
    step = last - seen[:, -2:-1] if prompt.shape[1] > 1 else torch.zeros_like(last)
    ahead = torch.arange(1, truth.shape[1] + 1, dtype=torch.float32)[None, :, None]
    h, w = truth.shape[-2:]
    moved = torch.minimum((last + ahead * step).clamp_min(0), torch.tensor([h - 1.0, w - 1.0]))

    def error(centres: Tensor) -> Tensor:
        return (centres - target).norm(dim=-1).mean(0)  # (F',)

    middle = (last + torch.tensor([(h - 1) / 2, (w - 1) / 2])) / 2
    return {"model": error(centre_of_mass(generated)),
            "copy_last": error(last.expand_as(target)),
            "constant_velocity": error(moved),
            "halfway_to_centre": error(middle.expand_as(target))}


def _bordered(frames: Tensor, shade: int, scale: int) -> Tensor:
    """(..., C, H, W) uint8 -> scaled up (nearest) and framed by a 2-pixel border of `shade`."""
    big = frames.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    return F.pad(big, (2, 2, 2, 2), value=shade)


def _scale(frames: Tensor, min_side: int = 64) -> int:
    return max(1, -(-min_side // frames.shape[-1]))


def save_strip(rows: list[Tensor], path: str | Path) -> Path:
    """Write clips (F, C, H, W), one per row, as one PNG; generated frames (marked by a white
    border) follow the prompt frames, and a truth row shows what really came next."""
    from torchvision.utils import save_image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    save_image(torch.cat(rows).float() / 255, tmp, nrow=len(rows[0]), padding=2, pad_value=0.5)
    tmp.replace(path)
    return path


def save_gif(frames: Tensor, path: str | Path, fps: float = 4.0) -> Path:
    """Write (T, C, H, W) uint8 frames as a looping animated GIF of T frames."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    images = [Image.fromarray(f.permute(1, 2, 0).squeeze(-1).numpy()) for f in frames]
    tmp = path.with_name(path.stem + ".tmp.gif")
    images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                   duration=round(1000 / fps), loop=0, disposal=1)
    tmp.replace(path)
    return path


def clip_panels(prompt: Tensor, generated: Tensor, truth: Tensor | None) -> tuple[list, Tensor]:
    """Framed clips for the strip (rows of (F, C, H', W')) and the GIF ((F, C, H'', W''):
    at time t the clips side by side, the model's row above the truth's, and a time bar)."""
    from torchvision.utils import make_grid

    scale, k = _scale(prompt), prompt.shape[1]
    shown = _bordered(prompt, PROMPT_SHADE, scale)  # (N, k, C, H', W')
    model = torch.cat([shown, _bordered(generated, NEW_SHADE, scale)], 1)  # (N, F, C, H', W')
    clips = [model] + ([torch.cat([shown, _bordered(truth, PROMPT_SHADE, scale)], 1)]
                       if truth is not None else [])
    rows = [clip[i] for i in range(len(prompt)) for clip in clips]
    frames = []
    for t in range(model.shape[1]):
        cells = torch.cat([clip[:, t] for clip in clips])  # (N * rows, C, H', W')
        grid = make_grid(cells, nrow=len(prompt), padding=2, pad_value=128)
        grid = grid[:cells.shape[1]]  # make_grid repeats a grey channel 3 times; keep one
        bar = torch.zeros(grid.shape[0], 4, grid.shape[-1], dtype=torch.uint8)
        bar[..., : grid.shape[-1] * (t + 1) // model.shape[1]] = \
            BAR_PROMPT if t < k else NEW_SHADE
        frames.append(torch.cat([grid, bar], -2))  # the bar shows where in the clip t is
    return rows, torch.stack(frames)


def read_frames(path: str | Path, size: tuple[int, int], channels: int) -> Tensor:
    """(T, C, H, W) uint8 frames of an animated GIF, or of a PNG strip of square frames side by
    side (width = T * height), each converted to `channels` and resized to `size`."""
    from PIL import Image, ImageSequence
    from torchvision.transforms.v2 import functional as TF

    path = Path(path).expanduser()
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            frames = [TF.pil_to_tensor(f.convert(mode)) for f in ImageSequence.Iterator(im)]
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"video.prompt={str(path)!r}: cannot read it as an image ({e}); "
                         f"allowed: an animated GIF or a PNG strip of square frames") from e
    if len(frames) == 1:
        strip = frames[0]  # (C, H, T * H)
        h, w = strip.shape[-2:]
        if w % h:
            raise ValueError(f"video.prompt={str(path)!r}: a {w}x{h} still image is not a strip "
                             f"of square frames (its width must be a multiple of its height)")
        frames = list(strip.split(h, -1))
    return torch.stack([TF.resize(f, list(size), antialias=True) for f in frames])


VIDEO_OPTIONS = {"num_clips": 8, "prompt_frames": 3, "new_frames": None, "prompt": "val",
                 "out": None, "fps": 4.0}


def generate_video_files(run: Any, cfg_video: dict, decoding: DecodingConfig,
                         progress: bool = True) -> list[Path]:
    """`armodal generate` on a video run: write continuations.gif, continuations.png and, when
    the true continuation is known, continuations.json (centre-of-mass errors against the
    copy-last-frame and constant-velocity peers); return their paths.

    cfg_video (conf/generate.yaml `video:`): num_clips, prompt_frames, new_frames (null: the
    rest of a training clip), prompt ("val": the first num_clips held-out clips; or a GIF /
    PNG strip file, continued num_clips times), out (a folder; null: <run>/generated), fps.
    """
    unknown = sorted(set(cfg_video) - set(VIDEO_OPTIONS))
    if unknown:
        raise ValueError(f"video options {unknown} are unknown; allowed: {list(VIDEO_OPTIONS)}")
    opts = {**VIDEO_OPTIONS, **cfg_video}
    layout = VideoLayout.for_run(run.space, run.meta, run.tokenizer)
    k, count = opts["prompt_frames"], opts["num_clips"]
    if not isinstance(count, int) or count < 1:
        raise ValueError(f"video.num_clips={count!r}: expected an integer >= 1")
    if not isinstance(k, int) or not 1 <= k < layout.frames:
        raise ValueError(f"video.prompt_frames={k!r}: expected an integer in [1, "
                         f"{layout.frames - 1}] (the run's clips have {layout.frames} frames)")
    new = opts["new_frames"] or layout.frames - k
    if opts["prompt"] == "val":
        dm = VideoDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space)
        dm.prepare_shards()
        clips = dm.val_clips.frames[:count]  # (N, F, C, H, W)
    else:
        tok = run.tokenizer
        clips = read_frames(opts["prompt"], tok.image_size, tok.channels)[None]
        if clips.shape[1] < k:
            raise ValueError(f"video.prompt_frames={k}, but {opts['prompt']} holds only "
                             f"{clips.shape[1]} frames")
        clips = clips.expand(count, *clips.shape[1:])  # the same prompt, count continuations
    prompt, truth = clips[:, :k], clips[:, k:k + new]
    truth = truth if truth.shape[1] == new else None  # a file may end before the new frames
    generated = continue_clips(run.model, run.tokenizer, layout, prompt, new, decoding,
                               progress=progress)
    rows, frames = clip_panels(prompt, generated, truth)
    directory = Path(opts["out"]) if opts["out"] else run.path / "generated"
    paths = [save_gif(frames, directory / "continuations.gif", opts["fps"]),
             save_strip(rows, directory / "continuations.png")]
    if truth is not None:
        errors = {name: e.tolist() for name, e in
                  continuation_errors(prompt, generated, truth).items()}
        summary = {"prompt_frames": k, "new_frames": new, "clips": len(prompt),
                   "centre_of_mass_error_px": errors,
                   "mean_px": {name: sum(e) / len(e) for name, e in errors.items()}}
        paths.append(directory / "continuations.json")
        paths[-1].write_text(json.dumps(summary, indent=2) + "\n")
    return paths


class SampleVideo(L.Callback):
    """After each validation: the first held-out clips continued from their first half, written
    as `<path>/step_XXXXXX.png` strips (logged to wandb as an image), and the mean centre-of-
    mass error of the generated frames logged as `val/com_error_px`."""

    def __init__(self, tokenizer: Any, layout: VideoLayout, clips: Tensor,
                 decoding: DecodingConfig, path: str, prompt_frames: int | None = None) -> None:
        self.tokenizer, self.layout, self.decoding = tokenizer, layout, decoding
        self.clips, self.path = clips, Path(path)  # clips: (N, F, C, H, W) uint8
        self.k = prompt_frames or clips.shape[1] // 2

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        prompt, truth = self.clips[:, :self.k], self.clips[:, self.k:]
        generated = continue_clips(pl_module.model, self.tokenizer, self.layout, prompt,
                                   truth.shape[1], self.decoding)
        rows, _ = clip_panels(prompt, generated, truth)
        png = save_strip(rows, self.path / f"step_{trainer.global_step:06d}.png")
        error = continuation_errors(prompt, generated, truth)["model"].mean()
        pl_module.log("val/com_error_px", error)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image("samples", [str(png)], step=trainer.global_step)
