"""train_audio_codec(cfg): from a composed audio codec config (conf/train_audio_codec.yaml) to a
saved codec."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import Dataset

from armodal.codecs.artefact import save_codec
from armodal.codecs.audio_codec import AudioCodec
from armodal.codecs.audio_lit import AudioCodecModule
from armodal.codecs.train import codec_train_loader, codec_val_loader, fit_and_validate
from armodal.data.audio import AudioSet, split_audio
from armodal.loggers import finish_runs


@dataclass
class AudioCodecTrainResult:
    run_dir: Path
    codec_dir: Path
    metrics: dict[str, float]  # the final held-out evaluation: val/si_snr, val/usage_level0, ...
    steps: int
    seconds: float
    module: AudioCodecModule  # the trained model stays reachable for callers (tests, benchmarks)
    trainer: L.Trainer


class Clips(Dataset):
    """Clips (N, S) as a dataset of waves (S',): a fresh random crop of `segment` samples per
    access when segment is set and shorter than S (training), else the whole clip."""

    def __init__(self, clips: Tensor, segment: int | None = None):
        self.clips, self.segment = clips, segment
        # Crops draw from torch's global RNG: a ResumableLoader seeds it per item.
        self.random_items = segment is not None and segment < clips.shape[1]

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> Tensor:
        clip = self.clips[i]  # (S,)
        if self.segment is None or self.segment >= clip.shape[0]:
            return clip
        # torch's global RNG, seeded per item by a ResumableLoader (random_items).
        start = int(torch.randint(clip.shape[0] - self.segment + 1, ()))
        return clip[start:start + self.segment]


def train_audio_codec(cfg: DictConfig) -> AudioCodecTrainResult:
    """Load and split the clips, fit the codec on random crops, evaluate on the whole held-out
    clips, save it to <run dir>/codec."""
    # Imported here: armodal.train dispatches `task: audio_codec` configs to this function.
    from armodal.train import start_run

    start = time.perf_counter()
    run_dir = start_run(cfg)

    data: AudioSet = instantiate(cfg.data.audio).load()
    # Split by clip before any cropping: no held-out clip is ever seen in training.
    train_set, val_set = split_audio(data, cfg.data.val_fraction, method=cfg.data.split,
                                     seed=cfg.seed)
    segment = round(cfg.data.segment_seconds * data.sample_rate)
    if segment < 1:
        raise ValueError(f"data.segment_seconds={cfg.data.segment_seconds} gives no samples "
                         f"at {data.sample_rate} Hz")
    train_loader = codec_train_loader(cfg, Clips(train_set.clips, segment), "clips")
    val_loader = codec_val_loader(cfg, Clips(val_set.clips))

    model: AudioCodec = instantiate(cfg.model, sample_rate=data.sample_rate)
    module = AudioCodecModule(model, optimizer=instantiate(cfg.optim.optimizer),
                              scheduler=instantiate(cfg.optim.scheduler), **cfg.loss)

    trainer, loggers = fit_and_validate(cfg, module, train_loader, val_loader, run_dir)
    metrics = dict(module.last_val)

    codec_dir = save_codec(run_dir / "codec", model, meta={
        "clip_seconds": data.seconds,
        "data": data.name,
        "train_clips": len(train_set),
        "val_clips": len(val_set),
        "metrics": metrics,
        "steps": trainer.global_step,
        "train_config": OmegaConf.to_container(cfg, resolve=True),
    })
    finish_runs(loggers)
    result = AudioCodecTrainResult(run_dir, codec_dir, metrics, trainer.global_step,
                                   time.perf_counter() - start, module, trainer)
    print(summary(result, model, len(val_set), data.seconds))
    return result


def summary(result: AudioCodecTrainResult, model: AudioCodec, val_clips: int,
            clip_seconds: float) -> str:
    """The end-of-run block: where the codec is, how good it is, how an LM recipe uses it."""
    m = result.metrics
    usage = " ".join(f"{100 * m.get(f'val/usage_level{k}', math.nan):.0f}"
                     for k in range(model.n_levels))
    return "\n".join([
        "",
        "=" * 72,
        f"audio codec trained in {result.seconds:.0f} s, {result.steps} steps",
        f"  run dir        {result.run_dir}",
        f"  held-out       {val_clips} clips of {clip_seconds:g} s at {model.sample_rate} Hz",
        f"  SI-SNR         {m.get('val/si_snr', math.nan):.2f} dB",
        f"  mel distance   {m.get('val/mel_distance', math.nan):.3f} (L1, log10 mel)",
        (f"  bitrate        {model.bitrate() / 1000:.2f} kbps: {model.frame_rate:g} frames/s x "
         f"{model.n_levels} levels x {math.log2(model.codebook_size):g} bits"),
        f"  code usage %   {usage} (per level, of {model.codebook_size} codes)",
        f"  codec          {result.codec_dir}",
        f"  use it         domain.tokenizer.codec={result.codec_dir}",
        "=" * 72,
    ])
