"""train_codec(cfg): from a composed codec config (conf/train_codec.yaml) to a saved codec."""

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
from torch.utils.data import DataLoader, Dataset, RandomSampler

from armodal.codecs.artefact import save_codec
from armodal.codecs.lit import VQVAEModule, bits_per_image
from armodal.codecs.vqvae import VQVAE
from armodal.data.datamodule import make_train_loader
from armodal.data.images import split_images
from armodal.loggers import finish_runs
from armodal.resume import AtomicCheckpointIO, ResumableLoader, fit_resumable


@dataclass
class CodecTrainResult:
    run_dir: Path
    codec_dir: Path
    metrics: dict[str, float]  # the final held-out evaluation: val/psnr, val/code_usage, ...
    grid: tuple[int, int]
    steps: int
    seconds: float
    module: VQVAEModule  # the trained model stays reachable for callers (tests, benchmarks)
    trainer: L.Trainer


class ImageTensors(Dataset):
    """uint8 images (N, C, H, W) as a dataset, with an optional per-image transform.

    A transform draws from torch's global RNG (torchvision's random transforms do): a
    ResumableLoader seeds it per item (random_items), so a resumed run sees the same images."""

    def __init__(self, images: Tensor, transform=None):
        self.images, self.transform = images, transform
        self.random_items = transform is not None

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        image = self.images[i]  # (C, H, W) uint8
        return image if self.transform is None else self.transform(image)


def train_codec(cfg: DictConfig) -> CodecTrainResult:
    """Load and split the images, fit the VQ-VAE, evaluate on the held-out split, save it."""
    # Imported here: armodal.train dispatches `task: codec` configs to this function.
    from armodal.train import start_run

    start = time.perf_counter()
    run_dir = start_run(cfg)

    data = instantiate(cfg.data.images).load()
    train_set, val_set = split_images(data, cfg.data.val_fraction, method=cfg.data.split,
                                      seed=cfg.seed)
    # Augmentation only ever touches training images: the held-out figures stay comparable.
    augment = instantiate(cfg.data.augment) if cfg.data.augment is not None else None
    train_loader = codec_train_loader(cfg, ImageTensors(train_set.images, augment), "images")
    val_loader = codec_val_loader(cfg, ImageTensors(val_set.images))

    channels, height, width = data.images.shape[1:]
    model: VQVAE = instantiate(cfg.model, in_channels=channels)
    grid = model.grid(height, width)  # refuses sizes the downsample does not divide
    module = VQVAEModule(model, optimizer=instantiate(cfg.optim.optimizer),
                         scheduler=instantiate(cfg.optim.scheduler), l1_weight=cfg.loss.l1_weight)

    trainer, loggers = fit_and_validate(cfg, module, train_loader, val_loader, run_dir)
    metrics = dict(module.last_val)

    codec_dir = save_codec(run_dir / "codec", model, meta={
        "image_size": [height, width],
        "grid": list(grid),
        "data": data.name,
        "train_images": len(train_set),
        "val_images": len(val_set),
        "metrics": metrics,
        "steps": trainer.global_step,
        "train_config": OmegaConf.to_container(cfg, resolve=True),
    })
    finish_runs(loggers)
    result = CodecTrainResult(run_dir, codec_dir, metrics, grid, trainer.global_step,
                              time.perf_counter() - start, module, trainer)
    print(summary(result, model.codebook_size, len(val_set)))
    return result


def codec_train_loader(cfg: DictConfig, dataset: Dataset, what: str) -> ResumableLoader:
    """Whole batches of `dataset` (`what`: its items, for the error), shuffled each epoch by a
    generator seeded with cfg.seed; resumable mid-epoch, exactly."""
    batch_size = cfg.data.batch_size
    if len(dataset) < batch_size:  # every batch is whole: such a split would give none
        raise ValueError(f"the train split has {len(dataset)} {what}, fewer than "
                         f"data.batch_size={batch_size}; lower data.batch_size (at most "
                         f"{len(dataset)}) or use more data")
    gen = torch.Generator().manual_seed(cfg.seed)
    # What DataLoader(shuffle=True, generator=gen) builds, the sampler made explicit.
    return make_train_loader(dataset, RandomSampler(dataset, generator=gen), batch_size,
                             cfg.data.num_workers, generator=gen)


def codec_val_loader(cfg: DictConfig, dataset: Dataset) -> DataLoader:
    """The held-out items in order. Its own generator: the workers' base seed each new
    iterator draws never comes from torch's global RNG, whose draws in training (k-means init,
    code restarts, quantizer dropout) are then the same with any num_workers, and after a
    resume (persistent workers draw once, when first created, which a resume moves)."""
    return DataLoader(dataset, shuffle=False, batch_size=cfg.data.batch_size,
                      num_workers=cfg.data.num_workers,
                      persistent_workers=cfg.data.num_workers > 0, generator=torch.Generator())


def fit_and_validate(cfg: DictConfig, module: L.LightningModule, train_loader: DataLoader,
                     val_loader: DataLoader, run_dir: Path) -> tuple[L.Trainer, list]:
    """Fit with the config's trainer, callbacks and loggers (from cfg.resume's checkpoint, if
    any), then validate once more unless the last step just did, so the codec's reported
    figures are those of its final weights. Returns the trainer and the loggers (for
    finish_runs); raises RunStopped when a signal stopped the run."""
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                     default_root_dir=str(run_dir),
                                     plugins=[AtomicCheckpointIO()])
    fit_resumable(trainer, module, run_dir, cfg.resume, train_dataloaders=train_loader,
                  val_dataloaders=val_loader)
    if not module.val_history or module.val_history[-1][0] != trainer.global_step:
        trainer.validate(module, dataloaders=val_loader, verbose=False)  # the final figure
    return trainer, loggers


def summary(result: CodecTrainResult, codebook_size: int, val_images: int) -> str:
    """The end-of-run block: where the codec is, how good it is, how an LM recipe uses it."""
    m = result.metrics
    h, w = result.grid
    return "\n".join([
        "",
        "=" * 72,
        f"codec trained in {result.seconds:.0f} s, {result.steps} steps",
        f"  run dir        {result.run_dir}",
        f"  held-out       {val_images} images, {h}x{w} codes of {codebook_size}",
        f"  PSNR           {m.get('val/psnr', math.nan):.2f} dB",
        (f"  codebook usage {100 * m.get('val/code_usage', math.nan):.1f} % "
         f"(perplexity {m.get('val/code_perplexity', math.nan):.1f} of {codebook_size})"),
        f"  bits / image   {bits_per_image(result.grid, codebook_size):.0f}",
        f"  codec          {result.codec_dir}",
        f"  use it         domain.tokenizer.codec={result.codec_dir}",
        "=" * 72,
    ])
