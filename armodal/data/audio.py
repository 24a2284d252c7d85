"""Raw audio sources: where sound comes from before an audio tokenizer sees it.

Everywhere in armodal a waveform is a float32 tensor in [-1, 1], mono. A source's `load()`
returns fixed-length clips stacked as an `AudioSet` (N, S) at one sample rate, with the
transcript of each clip where one is known (speech).

Sources read files lazily (at `load()` / `fingerprint()` time, not at construction) so that
Hydra configs naming data that is not on this machine still compose and instantiate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import soundfile as sf
import torch
import torchaudio.functional as AF
from torch import Tensor

from armodal.data.sources import fingerprint_files
from armodal.data.splits import split_indices

__all__ = ["AUDIO_EXTENSIONS", "AudioFolder", "AudioSet", "AudioSource", "SyntheticTones",
           "clips_and_texts", "cut_clips", "read_audio", "read_many", "read_native", "resample_many",
           "split_audio"]

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")
MONO_MODES = ("mix", "refuse")
# Native sample rates read_native accepts: anything outside is a damaged header, not audio (a
# rate of 1 Hz would turn each stored sample into thousands when resampled).
NATIVE_RATES = (1000, 768_000)
# Beyond this many elements, torchaudio's polyphase kernel (one row per output phase: rates
# with a small gcd, such as 44101 -> 16000 Hz, need gigabytes) is not built; the same
# windowed-sinc filter is then evaluated per output sample instead (_resample_direct).
_MAX_KERNEL = 1 << 24
_LOWPASS_WIDTH, _ROLLOFF = 6, 0.99  # torchaudio.functional.resample's defaults


@dataclass
class AudioSet:
    """Clips (N, S) float32 in [-1, 1] at `sample_rate`; `transcripts[i]` is clip i's text."""

    clips: Tensor
    sample_rate: int
    transcripts: list[str] | None
    name: str

    def __post_init__(self) -> None:
        if self.clips.dim() != 2 or self.clips.dtype != torch.float32:
            raise ValueError(f"AudioSet {self.name!r}: clips must be float32 (N, S), got "
                             f"{self.clips.dtype} {tuple(self.clips.shape)}")
        if self.transcripts is not None and len(self.transcripts) != len(self.clips):
            raise ValueError(f"AudioSet {self.name!r}: {len(self.transcripts)} transcripts for "
                             f"{len(self.clips)} clips")

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def seconds(self) -> float:
        """Length of one clip in seconds."""
        return self.clips.shape[1] / self.sample_rate

    def subset(self, index: Tensor) -> AudioSet:
        """The selected clips (int indices), same rate and name."""
        texts = None if self.transcripts is None else [self.transcripts[i] for i in index.tolist()]
        return AudioSet(self.clips[index], self.sample_rate, texts, self.name)


@runtime_checkable
class AudioSource(Protocol):
    """Anything that loads an AudioSet and gives a cheap identity for cache keys."""

    def load(self) -> AudioSet:
        ...

    def fingerprint(self) -> str:
        ...


def read_native(path: str | Path, mono: str = "mix") -> tuple[Tensor, int]:
    """One file (WAV / FLAC / OGG, via soundfile) as ((S,) float32, its own sample rate).

    mono="mix" averages the channels of a multi-channel file; "refuse" raises naming the file.
    Raises ValueError naming the file when it is unreadable, holds no samples, or declares a
    sample rate outside NATIVE_RATES."""
    if mono not in MONO_MODES:
        raise ValueError(f"mono={mono!r}; allowed: {', '.join(MONO_MODES)}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)  # (S, channels)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise ValueError(f"cannot read audio file {str(path)!r}: {err}") from err
    if data.shape[0] == 0:
        raise ValueError(f"audio file {str(path)!r} holds no samples")
    if not NATIVE_RATES[0] <= rate <= NATIVE_RATES[1]:
        raise ValueError(f"audio file {str(path)!r} declares a sample rate of {rate} Hz; allowed: "
                         f"{NATIVE_RATES[0]} to {NATIVE_RATES[1]} Hz (is its header damaged?)")
    if data.shape[1] > 1 and mono == "refuse":
        raise ValueError(f"audio file {str(path)!r} has {data.shape[1]} channels; mono audio "
                         f"is expected (mono=mix averages the channels)")
    return torch.from_numpy(data).mean(dim=1), rate


def read_audio(path: str | Path, sample_rate: int, mono: str = "mix") -> Tensor:
    """One file as (S,) float32 in [-1, 1] at `sample_rate` (see read_native)."""
    wave, rate = read_native(path, mono)
    return resample_many([wave], rate, sample_rate)[0]


def resample_many(waves: list[Tensor], rate: int, sample_rate: int) -> list[Tensor]:
    """Resample 1-D waves of one rate in a single pass (the sinc kernel is built once, which
    dominates for short files), clamped to [-1, 1]. Rates whose kernel would be huge (a small
    gcd) are resampled wave by wave with the same filter, evaluated directly."""
    if rate == sample_rate:
        return [w.clamp(-1.0, 1.0) for w in waves]
    if _kernel_size(rate, sample_rate) > _MAX_KERNEL:
        return [_resample_direct(w, rate, sample_rate).clamp(-1.0, 1.0) for w in waves]
    # Each wave is padded to a whole number of gcd blocks so its resampled length is exact and
    # the concatenation splits back cleanly; the padding's few samples of ringing are trimmed.
    block = rate // math.gcd(rate, sample_rate)
    lengths = [w.shape[0] for w in waves]
    padded = [torch.nn.functional.pad(w, (0, -n % block)) for w, n in zip(waves, lengths)]
    out = AF.resample(torch.cat(padded), rate, sample_rate)
    sizes = [p.shape[0] * sample_rate // rate for p in padded]
    return [piece[:math.ceil(n * sample_rate / rate)].clamp(-1.0, 1.0)
            for piece, n in zip(out.split(sizes), lengths)]


def _kernel_size(rate: int, sample_rate: int) -> int:
    """Elements of the kernel torchaudio's resample builds for rate -> sample_rate."""
    g = math.gcd(rate, sample_rate)
    orig, new = rate // g, sample_rate // g
    width = math.ceil(_LOWPASS_WIDTH * orig / (min(orig, new) * _ROLLOFF))
    return new * (orig + 2 * width)


def _resample_direct(wave: Tensor, rate: int, sample_rate: int) -> Tensor:
    """torchaudio.functional.resample's filter (Hann-windowed sinc, its default width and
    rolloff) evaluated for each output sample y[j] = sum_i x[i] h(i / rate - j / sample_rate):
    time and memory linear in the wave's length for any pair of rates, where the polyphase
    kernel grows with rate * sample_rate / gcd**2. Same result, up to float rounding."""
    n = wave.shape[0]
    n_out = -(-n * sample_rate // rate)
    base = min(rate, sample_rate) * _ROLLOFF
    reach = math.ceil(_LOWPASS_WIDTH * rate / base)  # input samples each side of an output
    taps = torch.arange(2 * reach + 2)
    x = torch.nn.functional.pad(wave.double(), (2 * reach + 2, 2 * reach + 2))  # zeros outside
    out = torch.empty(n_out, dtype=torch.float64)
    step = max(1, (1 << 20) // len(taps))
    for start in range(0, n_out, step):
        j = torch.arange(start, min(n_out, start + step))[:, None]
        i = (j * rate) // sample_rate - reach + taps  # (chunk, taps) input indices
        t = ((i * sample_rate - j * rate).double() / (rate * sample_rate) * base)
        t = t.clamp_(-_LOWPASS_WIDTH, _LOWPASS_WIDTH)
        h = torch.cos(t * (math.pi / _LOWPASS_WIDTH / 2)) ** 2
        t *= math.pi
        h *= torch.where(t == 0, torch.ones_like(t), t.sin() / t) * (base / rate)
        out[start:start + len(j)] = (x[i + 2 * reach + 2] * h).sum(1)
    return out.to(wave.dtype)


def read_many(paths: list[Path], sample_rate: int, mono: str = "mix") -> list[Tensor]:
    """Files as (S_i,) float32 waves at `sample_rate`, in order: the files of each native rate
    are resampled together in one pass (resample_many)."""
    natives = [read_native(path, mono) for path in paths]
    waves: list[Tensor | None] = [None] * len(natives)
    for rate in {rate for _, rate in natives}:
        index = [i for i, (_, r) in enumerate(natives) if r == rate]
        for i, wave in zip(index, resample_many([natives[i][0] for i in index], rate,
                                                sample_rate)):
            waves[i] = wave
    return waves


def clips_and_texts(waves: list[Tensor], texts: list[str], clip_samples: int
                    ) -> tuple[Tensor, list[str]]:
    """Every wave cut into clips (cut_clips), stacked (N, clip_samples), each clip with the
    text of the wave it came from."""
    cuts = [cut_clips(wave, clip_samples) for wave in waves]
    return torch.cat(cuts), [text for cut, text in zip(cuts, texts) for _ in range(len(cut))]


def cut_clips(wave: Tensor, clip_samples: int, min_fraction: float = 0.5) -> Tensor:
    """(S,) -> (n, clip_samples) consecutive clips; the last one is zero-padded when it holds
    at least min_fraction of a clip, else dropped (a wave shorter than that still gives one)."""
    n_full, rest = divmod(wave.shape[0], clip_samples)
    keep = n_full + int(rest >= min_fraction * clip_samples or n_full == 0)
    padded = torch.zeros(keep * clip_samples, dtype=wave.dtype)
    length = min(wave.shape[0], keep * clip_samples)
    padded[:length] = wave[:length]
    return padded.reshape(keep, clip_samples)


def split_audio(data: AudioSet, val_fraction: float, method: str = "tail",
                seed: int = 0) -> tuple[AudioSet, AudioSet]:
    """(train, val) clips, each in original order (armodal.data.splits.split_indices); a
    speech corpus keeps an utterance's clips together, so a tail split cuts at most one."""
    train, val = split_indices(len(data), val_fraction, method, seed, "split_audio (clips)")
    return data.subset(train), data.subset(val)


def _check_rate_and_length(sample_rate: int, clip_seconds: float, who: str) -> int:
    if not isinstance(sample_rate, int) or sample_rate < 1000:
        raise ValueError(f"{who}: sample_rate must be an int >= 1000 Hz, got {sample_rate!r}")
    clip_samples = round(clip_seconds * sample_rate)
    if clip_samples < 1:
        raise ValueError(f"{who}: clip_seconds={clip_seconds} gives no samples")
    return clip_samples


class AudioFolder:
    """Every WAV / FLAC / OGG file under `root` (recursively, sorted), resampled to
    `sample_rate`, mixed to mono (or refused, mono="refuse") and cut into clips.
    A `<name>.txt` file beside `<name>.wav` is that file's transcript."""

    def __init__(self, root: str, sample_rate: int = 16000, clip_seconds: float = 2.0,
                 mono: str = "mix", max_files: int | None = None) -> None:
        self.clip_samples = _check_rate_and_length(sample_rate, clip_seconds, "AudioFolder")
        if mono not in MONO_MODES:
            raise ValueError(f"AudioFolder: mono={mono!r}; allowed: {', '.join(MONO_MODES)}")
        self.root, self.sample_rate, self.clip_seconds = root, sample_rate, clip_seconds
        self.mono, self.max_files = mono, max_files

    def files(self) -> list[Path]:
        root = Path(os.path.expanduser(self.root))
        if not root.is_dir():
            raise FileNotFoundError(f"AudioFolder: root {str(root)!r} is not a directory")
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)
        if not found:
            raise ValueError(f"AudioFolder: no {'/'.join(AUDIO_EXTENSIONS)} files under "
                             f"{str(root)!r}")
        return found[:self.max_files]

    def load(self) -> AudioSet:
        files = self.files()
        transcripts = [path.with_suffix(".txt") for path in files]
        clips, texts = clips_and_texts(
            read_many(files, self.sample_rate, self.mono),
            [read_transcript(t) for t in transcripts],
            self.clip_samples)
        any_text = any(t.is_file() for t in transcripts)
        return AudioSet(clips, self.sample_rate, texts if any_text else None,
                        f"folder:{self.root}")

    def fingerprint(self) -> str:
        entries = [(p, str(p), p.stat().st_size) for p in self.files()]
        return fingerprint_files(entries, {"sample_rate": self.sample_rate, "mono": self.mono,
                                           "clip_seconds": self.clip_seconds})


class SyntheticTones:
    """Seeded synthetic clips, for tests and quick checks: each clip is a short melody of
    1-4 notes (sine partials with decaying harmonics, a soft attack and release), plus a
    little noise. Needs no file and no external program."""

    def __init__(self, n: int = 64, sample_rate: int = 16000, clip_seconds: float = 1.0,
                 seed: int = 0) -> None:
        self.clip_samples = _check_rate_and_length(sample_rate, clip_seconds, "SyntheticTones")
        if n < 1:
            raise ValueError(f"SyntheticTones: n must be >= 1, got {n}")
        self.n, self.sample_rate, self.clip_seconds, self.seed = n, sample_rate, clip_seconds, seed

    def load(self) -> AudioSet:
        gen = torch.Generator().manual_seed(self.seed)
        t = torch.arange(self.clip_samples) / self.sample_rate  # (S,) seconds
        clips = torch.zeros(self.n, self.clip_samples)
        for i in range(self.n):
            n_notes = int(torch.randint(1, 5, (), generator=gen))
            bounds = torch.linspace(0, self.clip_samples, n_notes + 1).long()
            for j in range(n_notes):
                lo, hi = int(bounds[j]), int(bounds[j + 1])
                # A pentatonic note between A3 and A5: melodies, not random frequencies.
                semitone = [0, 2, 4, 7, 9][int(torch.randint(5, (), generator=gen))] \
                    + 12 * int(torch.randint(3, (), generator=gen))
                f0 = 220.0 * 2 ** (semitone / 12)
                tt = t[lo:hi] - t[lo]
                note = sum(0.5 ** h * torch.sin(2 * math.pi * f0 * (h + 1) * tt) for h in range(3))
                envelope = torch.minimum(tt / 0.01, torch.ones_like(tt)) * torch.exp(-3 * tt)
                clips[i, lo:hi] = 0.4 * note * envelope
        clips += 0.003 * torch.randn(clips.shape, generator=gen)
        return AudioSet(clips.clamp(-1, 1), self.sample_rate, None, f"tones:{self.seed}")

    def fingerprint(self) -> str:
        return f"tones-{self.n}-{self.sample_rate}-{self.clip_seconds}-{self.seed}"


def read_transcript(path: Path) -> str:
    """The text of a clip's `.txt` transcript ("" when it has none), UTF-8."""
    if not path.is_file():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as err:
        raise ValueError(f"transcript {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}); save it as UTF-8") from None
