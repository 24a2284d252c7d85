"""Training callbacks armodal adds to Lightning's: a loss-curve PNG and generated samples
(text, image grids, audio clips) or closed-loop episodes (action runs)."""

from __future__ import annotations

import io
import time
from pathlib import Path

import lightning as L
import torch

from armodal.generation import DecodingConfig, generate
from armodal.textgen import decode_text, decoding_for, encode_prompt
from armodal.tokenizers.base import Tokenizer
from armodal.tokenizers.space import TokenSpace


class LossCurve(L.Callback):
    """Collects train and val loss per step and redraws `path` after every validation."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.train.append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:
        # Runs after ARModule.on_validation_epoch_end has recorded this validation's loss.
        self.val = list(getattr(pl_module, "val_history", []))
        if not trainer.sanity_checking and trainer.is_global_zero:  # one writer per run
            self.draw()

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            self.draw()

    def draw(self) -> None:
        if not self.train:
            return
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        steps, losses = zip(*self.train)
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train")
        if self.val:
            vsteps, vlosses = zip(*self.val)
            ax.plot(vsteps, vlosses, "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.stem + ".tmp.png")
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
        plt.close(fig)
        tmp.replace(self.path)


class SampleText(L.Callback):
    """Generates from `prompt` after each validation and logs the decoded text."""

    def __init__(self, tokenizer: Tokenizer, space: TokenSpace, prompt: str,
                 decoding: DecodingConfig, path: str):
        self.tokenizer, self.space, self.prompt, self.decoding = tokenizer, space, prompt, decoding
        self.path = Path(path)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        text = sample_text(pl_module.model, self.tokenizer, self.space, self.prompt,
                           self.decoding)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(f"--- step {trainer.global_step}\n{text}\n")
        for logger in trainer.loggers:
            if hasattr(logger, "log_text"):  # wandb: a table row per validation
                logger.log_text("samples", columns=["step", "text"],
                                data=[[trainer.global_step, text]], step=trainer.global_step)


def sample_text(model: torch.nn.Module, tokenizer: Tokenizer, space: TokenSpace, prompt: str,
                decoding: DecodingConfig) -> str:
    """Prompt text in, prompt + continuation text out (stops at eos)."""
    prompt_ids = encode_prompt(tokenizer, space, prompt)
    config = decoding_for(model, space, decoding, len(prompt_ids), warn=io.StringIO())
    out = generate(model, [prompt_ids], config)
    return prompt + decode_text(tokenizer, space, out.sequences[0])


class SampleImages(L.Callback):
    """After each validation: one image per class (conditional) or 8 images, written as
    `<path>/step_XXXXXX.png` and logged to wandb as an image."""

    def __init__(self, tokenizer: Tokenizer, layout, decoding: DecodingConfig, path: str,
                 unconditional_count: int = 8):
        self.tokenizer, self.layout, self.decoding = tokenizer, layout, decoding
        self.path = Path(path)
        self.labels = list(range(layout.null_label)) if layout.conditional else \
            [None] * unconditional_count

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from armodal.imagegen import sample_images, save_grid

        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        images = sample_images(pl_module.model, self.tokenizer, self.layout, self.labels,
                               self.decoding)
        png = save_grid(images, self.path / f"step_{trainer.global_step:06d}.png",
                        nrow=len(self.labels))
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image("samples", [str(png)], step=trainer.global_step)


class SampleAudio(L.Callback):
    """After each validation: `count` clips of `seconds` (null: the training clip length, or
    up to a quarter second of mu-law audio), written as `<path>/step_XXXXXX_<i>.wav` with a
    spectrogram PNG beside each, and logged to wandb as audio."""

    def __init__(self, tokenizer: Tokenizer, layout, decoding: DecodingConfig, path: str,
                 count: int = 2, seconds: float | None = None):
        self.tokenizer, self.layout, self.decoding = tokenizer, layout, decoding
        self.path, self.count, self.seconds = Path(path), count, seconds

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from armodal.audiogen import sample_audio, write_clips

        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        seconds = self.seconds or clip_seconds(pl_module.model, self.layout, self.tokenizer)
        waves = sample_audio(pl_module.model, self.tokenizer, self.layout, self.count, seconds,
                             self.decoding)
        rate = self.tokenizer.sample_rate
        wavs = write_clips(waves, rate, self.path, f"step_{trainer.global_step:06d}")
        for logger in trainer.loggers:
            if hasattr(logger, "log_audio"):  # wandb
                logger.log_audio("samples", [str(w) for w in wavs], step=trainer.global_step,
                                 sample_rate=[rate] * len(wavs))


class PlayEpisodes(L.Callback):
    """After each validation: the model plays `episodes` seeded episodes of its environment in
    closed loop (armodal.control) and logs their mean return as `val/return`, the figure an
    action run is for (the loss only says how well it imitates)."""

    def __init__(self, tokenizer, env_id: str, context: int, target_return: float | None,
                 episodes: int = 5, first_seed: int = 20_000):
        self.tokenizer, self.env_id, self.context = tokenizer, env_id, context
        self.target_return, self.seeds = target_return, list(range(first_seed,
                                                                  first_seed + episodes))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        from armodal.control.evaluate import play
        from armodal.control.policy import SequencePolicy

        policy = SequencePolicy(pl_module.model, self.tokenizer, self.context)
        score = play(policy, self.env_id, self.seeds, len(self.seeds), "model",
                     self.target_return)
        pl_module.log("val/return", score.mean, prog_bar=True)


def clip_seconds(model: torch.nn.Module, layout, tokenizer) -> float:
    """A codec run's training clip length; for mu-law a quarter second, or what the context
    holds when that is less and the model has no sliding window."""
    room = model.config.max_seq_len - 2  # after <bos> <boa>
    if layout.pattern is not None:
        # A training sequence: <bos> <boa> codes <eoa> <eos>, and the context is all but one.
        return layout.pattern.frames(room - 1) / tokenizer.frame_rate
    # A quarter second: a sample per step makes longer clips slow for every validation. A
    # sliding-window model gets it past its context (rolling cache), others only what fits.
    quarter = tokenizer.sample_rate // 4
    return (quarter if model.config.sliding_window else min(room, quarter)) / tokenizer.frame_rate


class WallClock(L.Callback):
    """Training wall-clock with validation time taken out, and tokens/s; logged at validation.

    `history` holds (global step, training seconds so far) per validation, so val loss can be
    read against time (the shakespeare benchmark does). Data loading counts as training.
    """

    def __init__(self):
        self.seconds = 0.0  # training time up to the last pause
        self.tokens = 0
        self.history: list[tuple[int, float]] = []
        self._running_since: float | None = None
        self._paused = False

    def elapsed(self) -> float:
        running = time.perf_counter() - self._running_since if self._running_since else 0.0
        return self.seconds + running

    def on_train_start(self, trainer, pl_module) -> None:
        self._running_since = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        tokens = batch["tokens"] if isinstance(batch, dict) else batch
        self.tokens += tokens[..., 1:].numel()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._paused = self._running_since is not None  # False for a validate() after fit
        self.seconds, self._running_since = self.elapsed(), None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self._paused:
            return
        self.history.append((trainer.global_step, self.seconds))
        pl_module.log_dict({"time/train_seconds": self.seconds,
                            "time/tokens_per_second": self.tokens / max(self.seconds, 1e-9)})

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused:
            self._running_since = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds, self._running_since = self.elapsed(), None


class SampleSegments(L.Callback):
    """After each validation, mixed-modality runs: the last segment of the first `count` val
    samples of each paired part, generated from the others (a caption from an image, an
    image from a caption). Text goes to `<path>/samples.txt` beside the truth, images to
    `<path>/step_XXXXXX_<part>.png`, speech to `<path>/step_XXXXXX_<part>_<i>.wav`."""

    def __init__(self, tokenizer, val_samples: dict[str, list], decoding: DecodingConfig,
                 path: str, count: int = 8):
        self.tokenizer, self.decoding, self.path = tokenizer, decoding, Path(path)
        self.samples = {part: samples[:count] for part, samples in val_samples.items()
                        if samples and len(samples[0]) >= 2}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from armodal.crossmodal import next_segment
        from armodal.crossmodal_io import write_segment

        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        step = trainer.global_step
        self.path.mkdir(parents=True, exist_ok=True)
        for part, samples in self.samples.items():
            modality = samples[0][-1][0]
            truths = [sample[-1][1] for sample in samples]
            outputs = [content for content, _ in next_segment(
                pl_module.model, self.tokenizer, [s[:-1] for s in samples], modality,
                self.decoding)]
            if modality == "text":  # one file for every validation, beside the truth
                with open(self.path / "samples.txt", "a") as f:
                    f.writelines(f"step {step} {part}: {out!r} (truth {t!r})\n"
                                 for out, t in zip(outputs, truths))
            else:  # a PNG grid, or the first two clips as WAVs
                write_segment(modality, outputs if modality == "image" else outputs[:2],
                              self.tokenizer.part(modality), self.path / f"step_{step:06d}_{part}")
