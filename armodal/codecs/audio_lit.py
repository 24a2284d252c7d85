"""AudioCodecModule: trains an AudioCodec on waveform batches; SI-SNR, mel distance, code usage.

Spectral distances here follow DAC's convention: mel filterbanks over STFT *magnitudes*
(power 1), compared as log10 values floored at 1e-5, so silence does not dominate the distance.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torchaudio.transforms import MelSpectrogram

from armodal.codecs.audio_codec import AudioCodec
from armodal.codecs.lit import VQVAEModule
from armodal.codecs.quantizers import usage_from_counts

MAX_SI_SNR = 100.0  # dB; a perfect reconstruction would be +inf and swamp the mean
LOG_FLOOR = 1e-5  # mel magnitudes below this are silence as far as the distances care


def si_snr(estimate: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """Scale-invariant SNR in dB per clip of waves (B, ..., S) -> (B,), clamped to +-100 dB.

    Both are made zero-mean, and the estimate is split into its projection on the target and
    the rest: 10 log10(|a t|^2 / |e - a t|^2) with a = <e, t> / |t|^2. A copy of the target at
    any gain (a sign flip included) or offset scores like the target itself.
    """
    if estimate.shape != target.shape or estimate.dim() < 2:
        raise ValueError(f"si_snr takes two waves (B, ..., S) of one shape, got "
                         f"{tuple(estimate.shape)} and {tuple(target.shape)}")
    e = estimate.double().flatten(1)  # (B, N)
    t = target.double().flatten(1)
    e, t = e - e.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    scale = (e * t).sum(1, keepdim=True) / (t.pow(2).sum(1, keepdim=True) + eps)  # (B, 1)
    projection = scale * t  # (B, N) the part of the estimate that is the target
    noise = e - projection
    ratio = (projection.pow(2).sum(1) + eps) / (noise.pow(2).sum(1) + eps)
    return (10 * torch.log10(ratio)).clamp(-MAX_SI_SNR, MAX_SI_SNR).float()


def log_mel(wave: Tensor, transform: MelSpectrogram) -> Tensor:
    """Waves (B, ..., S) -> log10 mel magnitudes (B, ..., n_mels, frames), floored."""
    return torch.log10(transform(wave.float()).clamp_min(LOG_FLOOR))


def mel_transform(sample_rate: int, n_fft: int, n_mels: int) -> MelSpectrogram:
    """Magnitude mel spectrogram, hop n_fft / 4, Hann window, slaney-normalised filters."""
    return MelSpectrogram(sample_rate, n_fft=n_fft, hop_length=n_fft // 4, n_mels=n_mels,
                          power=1.0, norm="slaney", mel_scale="slaney")


def mel_distance(estimate: Tensor, target: Tensor, sample_rate: int, n_fft: int = 1024,
                 n_mels: int = 80) -> Tensor:
    """Mean L1 distance per clip between log10 mel magnitudes of waves (B, ..., S) -> (B,)."""
    if estimate.shape != target.shape or estimate.dim() < 2:
        raise ValueError(f"mel_distance takes two waves (B, ..., S) of one shape, got "
                         f"{tuple(estimate.shape)} and {tuple(target.shape)}")
    transform = mel_transform(sample_rate, n_fft, n_mels).to(estimate.device)
    diff = log_mel(estimate, transform) - log_mel(target, transform)  # (B, ..., n_mels, frames)
    return diff.abs().flatten(1).mean(1)


class MultiResolutionMelLoss(nn.Module):
    """Mean over FFT sizes of L1(log mel) + linear_weight * L1(mel): small FFTs keep timing,
    large ones pitch harmonics; one resolution alone lets the other's errors through."""

    def __init__(self, sample_rate: int, fft_sizes: Sequence[int] = (256, 512, 1024, 2048),
                 n_mels: Sequence[int] = (32, 64, 80, 128), linear_weight: float = 0.0):
        super().__init__()
        if len(fft_sizes) != len(n_mels) or not fft_sizes:
            raise ValueError(f"fft_sizes={list(fft_sizes)}, n_mels={list(n_mels)}; need one "
                             f"mel count per FFT size, at least one")
        self.linear_weight = linear_weight
        self.transforms = nn.ModuleList(mel_transform(sample_rate, n, m)
                                        for n, m in zip(fft_sizes, n_mels))

    def forward(self, estimate: Tensor, target: Tensor) -> Tensor:  # waves (B, 1, S) -> ()
        total = estimate.new_zeros((), dtype=torch.float32)
        for transform in self.transforms:
            mel_e, mel_t = transform(estimate.float()), transform(target.float())
            total = total + F.l1_loss(torch.log10(mel_e.clamp_min(LOG_FLOOR)),
                                      torch.log10(mel_t.clamp_min(LOG_FLOOR)))
            if self.linear_weight:
                total = total + self.linear_weight * F.l1_loss(mel_e, mel_t)
        return total / len(self.transforms)


class AudioCodecModule(L.LightningModule):
    """mel_weight * multi-resolution mel loss + wave_weight * L1(wave)
    - si_snr_weight * SI-SNR (dB, mean per clip) + the RVQ's loss.

    The mel loss gets the spectrum right but is blind to phase; L1 on the waveform alone mostly
    teaches a small codec to output its mean (silence). The SI-SNR term rewards a waveform in
    phase with the input whatever its gain, which is what lifts held-out SI-SNR above 0 dB.

    Batches are waves (B, S) or (B, 1, S) in [-1, 1]. Validation sums over the whole val set,
    so the epoch figures are exact: `val/si_snr` (dB, mean per clip), `val/mel_distance` (mean
    per clip, at 1024-point FFTs, 80 mels), `val/bitrate` (bits/s at all levels),
    `val/usage_level{k}` and `val/perplexity_level{k}` per RVQ level, `val/loss`.
    """

    def __init__(self, model: AudioCodec, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., LambdaLR] | None = None, mel_weight: float = 1.0,
                 wave_weight: float = 1.0, si_snr_weight: float = 0.0,
                 linear_mel_weight: float = 0.0,
                 fft_sizes: Sequence[int] = (256, 512, 1024, 2048),
                 n_mels: Sequence[int] = (32, 64, 80, 128)):
        super().__init__()
        weights = {"mel_weight": mel_weight, "wave_weight": wave_weight,
                   "si_snr_weight": si_snr_weight}
        if min(weights.values()) < 0 or max(weights.values()) == 0:
            raise ValueError(f"loss weights {weights}; all must be >= 0 and one > 0")
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.mel_weight, self.wave_weight = mel_weight, wave_weight
        self.si_snr_weight = si_snr_weight
        self.mel_loss = MultiResolutionMelLoss(model.sample_rate, fft_sizes, n_mels,
                                               linear_mel_weight)
        self.val_history: list[tuple[int, float]] = []  # (global step, val loss)
        self.last_val: dict[str, float] = {}

    def losses(self, wave: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """Waves -> (total loss, named parts, reconstruction (B, 1, S), codes (B, K, T))."""
        x = wave[:, None] if wave.dim() == 2 else wave  # (B, 1, S)
        recon, codes, q_loss = self.model(x)
        parts = {"mel": self.mel_loss(recon, x), "wave_l1": F.l1_loss(recon, x),
                 "quantizer": q_loss}
        total = self.mel_weight * parts["mel"] + self.wave_weight * parts["wave_l1"] + q_loss
        if self.si_snr_weight:
            parts["si_snr"] = si_snr(recon, x).mean()
            total = total - self.si_snr_weight * parts["si_snr"]
        return total, parts, recon, codes

    # The image codec's step: this module's losses() has the same (total, parts, ...) shape.
    training_step = VQVAEModule.training_step

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(3, dtype=torch.float64)  # loss, si_snr, mel distance
        self._val_clips = torch.zeros((), dtype=torch.float64)
        self._val_counts = torch.zeros(self.model.n_levels, self.model.codebook_size,
                                       dtype=torch.float64)  # (K, codebook) code counts

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss, _, recon, codes = self.losses(batch)
        target = batch.reshape(recon.shape)  # (B, 1, S)
        # Sums, not means of batch means: a short last batch weighs what its clips weigh.
        self._val_sums += torch.stack([
            loss.detach().double() * batch.shape[0],
            si_snr(recon.detach(), target).double().sum(),
            mel_distance(recon.detach(), target, self.model.sample_rate).double().sum(),
        ]).cpu()
        self._val_clips += batch.shape[0]
        for k in range(self.model.n_levels):
            self._val_counts[k] += torch.bincount(codes[:, k].flatten(),
                                                  minlength=self.model.codebook_size) \
                .double().cpu()

    def on_validation_epoch_end(self) -> None:
        gather = self.all_gather
        clips = gather(self._val_clips).sum()
        sums = gather(self._val_sums).reshape(-1, 3).sum(0) / clips
        counts = gather(self._val_counts).reshape(-1, *self._val_counts.shape).sum(0)
        metrics = {"val/loss": float(sums[0]), "val/si_snr": float(sums[1]),
                   "val/mel_distance": float(sums[2]), "val/bitrate": self.model.bitrate()}
        for k, level_counts in enumerate(counts):
            usage, perplexity = usage_from_counts(level_counts)
            metrics[f"val/usage_level{k}"] = usage
            metrics[f"val/perplexity_level{k}"] = perplexity
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, metrics["val/loss"]))
            self.last_val = metrics
        self.log_dict(metrics, prog_bar=False)

    # The image codec's optimizer set-up, unchanged: AdamW with decay on conv / linear matrices
    # only (never on biases or codebooks), and the warmup-cosine schedule over max_steps.
    configure_optimizers = VQVAEModule.configure_optimizers
