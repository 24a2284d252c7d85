"""Audio generation: sample clips (or continue prompt clips) in time order, write WAV + PNG.

mu-law runs decode one sample per step with `generate` (a sliding-window model runs past its
context with a rolling cache); codec runs decode K code levels per frame with `generate_codes`
under the run's stream pattern (delay: frames + K - 1 steps), then the codec's decoder turns the
codes into a waveform.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from torch import Tensor
from tqdm.auto import tqdm

from armodal.data.audio import read_audio
from armodal.data.audio_module import AudioDataModule, AudioLayout
from armodal.generation import DecodingConfig, generate
from armodal.generation.streams import generate_codes

__all__ = ["generate_audio", "sample_audio", "save_spectrogram", "save_wav"]


@torch.no_grad()
def sample_audio(model: torch.nn.Module, tokenizer: Any, layout: AudioLayout, n: int,
                 seconds: float, decoding: DecodingConfig, prompts: Tensor | None = None,
                 progress: bool = False) -> Tensor:
    """(n, S) float32 waveforms of `seconds` each, S = seconds * sample_rate (codec runs: a
    whole number of frames). prompts (n, P) waveforms: each output starts with its prompt
    (re-encoded, so lossy for codecs) and continues it."""
    frames = round(seconds * tokenizer.frame_rate)
    if frames < 1:
        raise ValueError(f"seconds={seconds} is shorter than one {tokenizer.unit}")
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompt clips for {n} outputs; give one per output")
    seeds = [decoding.seed + i if decoding.seed is not None else None for i in range(n)]
    if layout.pattern is None:
        return _sample_mulaw(model, tokenizer, layout, n, frames, decoding, prompts, seeds,
                             progress)
    prompt_codes = None if prompts is None else tokenizer.encode_batch(prompts)  # (n, K, Tp)
    if prompt_codes is not None and prompt_codes.shape[-1] >= frames:
        raise ValueError(f"the prompt holds {prompt_codes.shape[-1]} frames, not fewer than "
                         f"the {frames} asked for; ask for more seconds or a shorter prompt")
    prefix = layout.prefix().expand(n, -1, -1)  # (n, n_streams, 2)
    with tqdm(total=layout.pattern.length(frames), desc="audio frames", unit="step",
              leave=False, disable=not progress) as bar:
        codes = generate_codes(model, prefix, layout.pattern, frames, decoding,
                               code_offset=layout.code_offset, fill_id=layout.space.pad_id,
                               prompt_codes=prompt_codes, seeds=seeds,
                               on_step=lambda *_: bar.update(1))
    return tokenizer.decode(codes)  # (n, S)


def _sample_mulaw(model, tokenizer, layout, n, samples, decoding, prompts, seeds, progress):
    head = layout.prefix()[0].tolist()  # <bos> <boa>
    if prompts is None:
        rows = [head] * n
    else:
        tokens = tokenizer.encode_batch(prompts) + layout.code_offset  # (n, P)
        rows = [head + row.tolist() for row in tokens]
    new = samples - (len(rows[0]) - len(head))
    if new < 1:
        raise ValueError(f"the prompt holds {len(rows[0]) - len(head)} samples, not fewer "
                         f"than the {samples} asked for")
    # A fixed length of audio: no stop, every step inside the audio ids.
    config = dataclasses.replace(decoding, max_new_tokens=new, min_new_tokens=0,
                                 stop_token_ids=(), stop_sequences=(), stop_strings=())
    with tqdm(total=new, desc="audio samples", unit="step", leave=False,
              disable=not progress) as bar:
        out = generate(model, rows, config, allowed_mask=layout.space.modality_mask("audio"),
                       seeds=seeds, on_token=lambda row, _: row == 0 and bar.update(1))
    ids = torch.tensor([row[len(head):] + seq for row, seq in zip(rows, out.sequences)])
    return tokenizer.decode(ids - layout.code_offset)


def save_wav(wave: Tensor, sample_rate: int, path: str | Path) -> Path:
    """(S,) float waveform -> 16-bit PCM WAV, written to a temp name and renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    sf.write(str(tmp), wave.detach().float().clamp(-1, 1).cpu().numpy(), sample_rate,
             subtype="PCM_16", format="WAV")
    os.replace(tmp, path)
    return path


def save_spectrogram(wave: Tensor, sample_rate: int, path: str | Path,
                     title: str | None = None) -> Path:
    """A log-mel spectrogram PNG of (S,) float audio (80 mel bands, 25 ms windows)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    import torchaudio

    n_fft = 1 << (int(0.025 * sample_rate) - 1).bit_length()
    mel = torchaudio.transforms.MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4,
                                               n_mels=80)(
        torch.nn.functional.pad(wave.detach().float().cpu(), (0, max(0, n_fft - len(wave)))))
    log_mel = 10 * torch.log10(mel.clamp_min(1e-10))  # (80, frames) dB
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.imshow(log_mel.numpy(), origin="lower", aspect="auto", cmap="magma",
              vmin=float(log_mel.max()) - 80, extent=(0, wave.shape[-1] / sample_rate, 0, 80))
    ax.set_xlabel("seconds")
    ax.set_ylabel("mel band")
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def write_clips(waves: Tensor, sample_rate: int, directory: Path, stem: str) -> list[Path]:
    """Each (S,) of waves (N, S) as <stem>_<i>.wav with <stem>_<i>.png beside it."""
    paths = []
    for i, wave in enumerate(waves):
        wav = save_wav(wave, sample_rate, directory / f"{stem}_{i}.wav")
        save_spectrogram(wave, sample_rate, wav.with_suffix(".png"), title=wav.name)
        paths.append(wav)
    return paths


def generate_audio(run: Any, decoding: DecodingConfig, num_samples: int = 4,
                   seconds: float | None = None, prompt: str | None = None,
                   prompt_seconds: float = 0.5, out: str | None = None,
                   progress: bool = True) -> list[Path]:
    """`armodal generate` on an audio run: write WAV + spectrogram PNG files, return the WAVs.

    seconds: null = the run's clip length. prompt: a WAV / FLAC / OGG file (its first
    prompt_seconds, resampled), or "val" (the first num_samples held-out clips); the outputs
    continue it and the prompts are written beside them (prompt_<i>.wav).
    """
    layout = AudioLayout.for_run(run.space, run.meta, run.tokenizer)
    audio_meta = run.meta.get("audio") or {}
    rate = run.tokenizer.sample_rate
    seconds = seconds or audio_meta.get("clip_seconds") or 1.0
    directory = Path(out) if out else run.path / "generated"
    prompts = None
    if prompt is not None:
        keep = round(prompt_seconds * rate)
        if prompt == "val":
            dm = AudioDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space)
            dm.prepare_shards()
            clips = dm.val_audio.clips[:num_samples]
        else:
            clips = read_audio(prompt, rate)[None].expand(num_samples, -1)
        if clips.shape[-1] < keep or keep < 1:
            raise ValueError(f"prompt_seconds={prompt_seconds}: the prompt clip holds "
                             f"{clips.shape[-1] / rate:.2f} s")
        prompts = clips[:, :keep].contiguous()
        num_samples = len(prompts)
        write_clips(prompts, rate, directory, "prompt")
    waves = sample_audio(run.model, run.tokenizer, layout, num_samples, seconds, decoding,
                         prompts, progress=progress)
    return write_clips(waves, rate, directory, "continuation" if prompts is not None
                       else "sample")
