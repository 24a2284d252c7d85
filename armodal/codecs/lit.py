"""VQVAEModule: trains a VQVAE on uint8 image batches, reports PSNR and codebook usage."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from armodal.codecs.quantizers import usage_from_counts
from armodal.codecs.vqvae import VQVAE, to_uint8, to_unit

MAX_PSNR = 100.0  # dB; a pixel-perfect image would be +inf and swamp the mean


def image_psnr(recon: Tensor, target: Tensor) -> Tensor:
    """Per-image PSNR in dB of uint8 images (B, C, H, W): 10 log10(255^2 / MSE), capped."""
    if recon.shape != target.shape or recon.dtype != torch.uint8 or target.dtype != torch.uint8:
        raise ValueError(f"image_psnr takes two uint8 tensors of one shape, got "
                         f"{recon.dtype} {tuple(recon.shape)} and {target.dtype} "
                         f"{tuple(target.shape)}")
    mse = (recon.double() - target.double()).pow(2).flatten(1).mean(1)  # (B,)
    floor = 255.0 ** 2 / 10 ** (MAX_PSNR / 10)
    return 10 * torch.log10(255.0 ** 2 / mse.clamp_min(floor))


class VQVAEModule(L.LightningModule):
    """Reconstruction loss (MSE on [-1, 1] pixels, + l1_weight * L1) + the quantizer's loss.

    Batches are uint8 images (B, C, H, W). Validation sums over the whole val set, so the
    epoch figures are exact: `val/psnr` (mean per-image PSNR of the uint8 reconstructions),
    `val/code_usage` (fraction of the codebook used), `val/code_perplexity`, `val/loss`.
    """

    def __init__(self, model: VQVAE, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., LambdaLR] | None = None, l1_weight: float = 0.0):
        super().__init__()
        if l1_weight < 0:
            raise ValueError(f"l1_weight={l1_weight}; must be >= 0")
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.l1_weight = l1_weight
        self.val_history: list[tuple[int, float]] = []  # (global step, val loss)
        self.last_val: dict[str, float] = {}

    def losses(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor, Tensor]:
        """uint8 images -> (total loss, named parts, float reconstruction, codes (B, h, w))."""
        x = to_unit(images)  # (B, C, H, W)
        recon, codes, q_loss = self.model(x)
        mse = F.mse_loss(recon, x)
        total = mse + q_loss
        parts = {"mse": mse, "quantizer": q_loss}
        if self.l1_weight:
            parts["l1"] = F.l1_loss(recon, x)
            total = total + self.l1_weight * parts["l1"]
        return total, parts, recon, codes

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss, parts, _, _ = self.losses(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{name}": value for name, value in parts.items()})
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_loss = torch.zeros((), dtype=torch.float64)
        self._val_psnr = torch.zeros((), dtype=torch.float64)
        self._val_images = torch.zeros((), dtype=torch.float64)
        self._val_counts = torch.zeros(self.model.codebook_size, dtype=torch.float64)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        loss, _, recon, codes = self.losses(batch)
        n = batch.shape[0]
        # Sums, not means of batch means: a short last batch weighs what its images weigh.
        self._val_loss += loss.detach().double().cpu() * n
        self._val_psnr += image_psnr(to_uint8(recon), batch).sum().cpu()
        self._val_images += n
        self._val_counts += torch.bincount(codes.flatten(), minlength=self.model.codebook_size) \
            .double().cpu()

    def on_validation_epoch_end(self) -> None:
        gather = self.all_gather
        images = gather(self._val_images).sum()
        counts = gather(self._val_counts).reshape(-1, self.model.codebook_size).sum(0)
        usage, perplexity = usage_from_counts(counts)
        metrics = {"val/loss": float(gather(self._val_loss).sum() / images),
                   "val/psnr": float(gather(self._val_psnr).sum() / images),
                   "val/code_usage": usage, "val/code_perplexity": perplexity}
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, metrics["val/loss"]))
            self.last_val = metrics
        self.log_dict(metrics, prog_bar=True)

    def configure_optimizers(self):
        # Weight decay on conv / linear matrices only: not on biases, and never on a learned
        # codebook, which decay would pull towards 0, away from the encoder outputs.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 and not name.startswith("quantizer.") else no_decay) \
                    .append(p)
        optimizer = self.optimizer_factory([{"params": decay},
                                            {"params": no_decay, "weight_decay": 0.0}])
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def bits_per_image(grid: tuple[int, int], codebook_size: int) -> float:
    """h * w * log2(K): the size of one image's codes at a uniform code distribution."""
    return grid[0] * grid[1] * math.log2(codebook_size)
