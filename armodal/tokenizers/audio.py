"""Audio tokenizers: mu-law samples (WaveNet) and the codes of a trained neural codec.

A waveform is (S,) float32 in [-1, 1], mono, at the tokenizer's `sample_rate`; audio at another
rate is resampled when it is read (armodal.data.audio.read_audio, the audio sources).

MuLawTokenizer: one token per sample, 2^bits levels after mu-law companding (fine steps near
    silence, coarse ones at full scale): (S,) -> (S,).
CodecTokenizer: K residual codebook levels per codec frame: (S,) -> (K, T), T = ceil(S / hop).
    A stream pattern (armodal/tokenizers/patterns.py) lays the K streams out for the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torchaudio.functional as AF
from torch import Tensor

__all__ = ["CodecTokenizer", "MuLawTokenizer", "check_wave"]


def _target(obj: object) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def check_wave(wave: Tensor, who: str, batched: bool = False) -> Tensor:
    """A float waveform (S,) (or (N, S) when batched) as float32; ValueError naming `who`."""
    want = "(N, S)" if batched else "(S,)"
    if not isinstance(wave, Tensor) or not wave.dtype.is_floating_point \
            or wave.dim() != (2 if batched else 1):
        got = f"{wave.dtype} {tuple(wave.shape)}" if isinstance(wave, Tensor) \
            else type(wave).__name__
        raise ValueError(f"{who}: expected a float mono waveform {want} in [-1, 1], got {got}; "
                         f"mix multi-channel audio to mono first")
    if wave.shape[-1] == 0:
        raise ValueError(f"{who}: the waveform holds no samples")
    if not torch.isfinite(wave).all():
        raise ValueError(f"{who}: the waveform holds NaN or inf samples")
    return wave.float()


class MuLawTokenizer:
    """Samples -> mu-law companded levels in [0, 2^bits) (torchaudio's mu_law_encoding).

    Lossy: decoding returns the level's centre, within half a companded step of the input.
    """

    modality = "audio"
    unit = "sample"
    lossless = False
    n_levels = 1  # one token stream

    def __init__(self, sample_rate: int = 8000, bits: int = 8) -> None:
        if not isinstance(bits, int) or not 1 <= bits <= 16:
            raise ValueError(f"MuLawTokenizer: bits must be an int in [1, 16], got {bits!r}")
        if not isinstance(sample_rate, int) or sample_rate < 1000:
            raise ValueError(f"MuLawTokenizer: sample_rate must be an int >= 1000 Hz, got "
                             f"{sample_rate!r}")
        self.sample_rate, self.bits = sample_rate, bits
        self.vocab_size = 2 ** bits
        self.frame_rate = float(sample_rate)  # tokens per second

    def encode(self, sample: Tensor) -> Tensor:
        """(S,) float waveform -> (S,) int64 levels."""
        return self.encode_batch(check_wave(sample, "MuLawTokenizer.encode")[None])[0]

    def encode_batch(self, clips: Tensor) -> Tensor:
        """(N, S) float clips -> (N, S) int64 levels."""
        clips = check_wave(clips, "MuLawTokenizer.encode_batch", batched=True)
        return AF.mu_law_encoding(clips.clamp(-1.0, 1.0), self.vocab_size).long()

    def decode(self, ids: Tensor) -> Tensor:
        """(..., S) levels -> (..., S) float32 waveform."""
        _check_ids(ids, self.vocab_size, "MuLawTokenizer.decode")
        return AF.mu_law_decoding(ids, self.vocab_size).float()

    def count_units(self, sample: Tensor) -> int:
        return int(sample.shape[-1])

    def config(self) -> dict:
        return {"target": _target(self),
                "init": {"sample_rate": self.sample_rate, "bits": self.bits}, "state": {}}


class CodecTokenizer:
    """Residual codes of a trained, frozen audio codec (`armodal train audio_codec`).

    `codec` is the codec directory the codec recipe wrote; `n_q` keeps only its first n_q
    levels (a lower bitrate; the codec was trained with quantizer dropout for this). The weights'
    sha256 is kept in the tokenizer state, so a language model never decodes with another codec.
    """

    modality = "audio"
    unit = "frame"
    lossless = False

    def __init__(self, codec: str, n_q: int | None = None) -> None:
        from armodal.codecs.artefact import AUDIO_KIND, load_codec

        self.path = Path(codec).expanduser()
        self.model, self.meta = load_codec(self.path, kind=AUDIO_KIND)
        levels = self.model.n_levels
        if n_q is not None and not 1 <= n_q <= levels:
            raise ValueError(f"n_q={n_q}; codec {str(self.path)!r} has {levels} levels, so "
                             f"n_q must be in [1, {levels}] (or null for all)")
        self.n_levels = n_q or levels
        self._init = {"codec": str(codec), "n_q": n_q}
        self.sample_rate = int(self.model.sample_rate)
        self.hop = int(self.model.hop)
        self.codebook_size = int(self.model.codebook_size)
        self.vocab_size = self.codebook_size  # per stream: a stream pattern lays levels out
        self.frame_rate = self.sample_rate / self.hop
        self.codec_sha256 = self.meta["weights_sha256"]

    @property
    def bitrate(self) -> float:
        """Bits per second of the codes at a uniform code distribution."""
        return self.model.bitrate(self.n_levels)

    def encode(self, sample: Tensor) -> Tensor:
        """(S,) float waveform -> (K, T) int64 codes."""
        return self.encode_batch(check_wave(sample, "CodecTokenizer.encode")[None])[0]

    @torch.inference_mode()
    def encode_batch(self, clips: Tensor, batch_size: int = 64) -> Tensor:
        """(N, S) float clips -> (N, K, T) int64 codes, in batches through the encoder."""
        clips = check_wave(clips, "CodecTokenizer.encode_batch", batched=True)
        return torch.cat([self.model.encode(b[:, None], n_q=self.n_levels)
                          for b in clips.split(batch_size)])

    @torch.inference_mode()
    def encode_clips(self, clips: Sequence[Tensor], batch_size: int = 64) -> list[Tensor]:
        """Clips of any lengths [(S_i,)] -> [(K, T_i)] codes, equal to encode() of each.

        Clips are sorted by length and batched, each batch zero-padded on the right to its
        longest clip: every conv is causal, so a clip's frames never see the padding after it,
        and its codes are cut back to its own T_i = ceil(S_i / hop) frames."""
        waves = [check_wave(c, f"CodecTokenizer.encode_clips (clip {i})")
                 for i, c in enumerate(clips)]
        order = sorted(range(len(waves)), key=lambda i: waves[i].shape[0])
        out: list[Tensor | None] = [None] * len(waves)
        for start in range(0, len(order), batch_size):
            group = order[start: start + batch_size]
            longest = waves[group[-1]].shape[0]
            batch = torch.stack([torch.nn.functional.pad(waves[i], (0, longest - len(waves[i])))
                                 for i in group])  # (B, S_max)
            codes = self.model.encode(batch[:, None], n_q=self.n_levels)  # (B, K, T_max)
            for row, i in enumerate(group):
                out[i] = codes[row, :, :self.model.frames(len(waves[i]))]
        return out

    @torch.inference_mode()
    def decode(self, ids: Tensor) -> Tensor:
        """(K, T) or (N, K, T) codes -> (S,) or (N, S) float32 waveform, S = T * hop."""
        single = ids.dim() == 2
        codes = ids[None] if single else ids
        if codes.dim() != 3 or codes.shape[1] != self.n_levels:
            raise ValueError(f"CodecTokenizer.decode: expected codes (K, T) or (N, K, T) with "
                             f"K = {self.n_levels}, got shape {tuple(ids.shape)}")
        _check_ids(codes, self.codebook_size, "CodecTokenizer.decode")
        wave = self.model.decode(codes)[:, 0]  # (N, S)
        return wave[0] if single else wave

    def count_units(self, sample: Tensor) -> int:
        """Codec frames in a waveform."""
        return -(-int(sample.shape[-1]) // self.hop)

    def state_dict(self) -> dict:
        return {"codec_sha256": self.codec_sha256}

    def load_state_dict(self, state: dict) -> None:
        from armodal.codecs.artefact import check_codec_state

        check_codec_state(self.path, self.codec_sha256, state)

    def config(self) -> dict:
        return {"target": _target(self), "init": dict(self._init), "state": self.state_dict()}


def _check_ids(ids: Tensor, vocab_size: int, who: str) -> None:
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{who}: expected integer ids, got "
                         f"{getattr(ids, 'dtype', type(ids).__name__)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{who}: ids span [{int(ids.min())}, {int(ids.max())}], outside "
                         f"[0, {vocab_size})")
