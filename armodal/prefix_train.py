"""`task: prefix_captioning`: train a captioner that reads images as prefix embeddings
(armodal/prefix.py) instead of code tokens, and caption with it.

A run directory holds the transformer as any run does (model.safetensors + config.json with a
"prefix" entry) and the encoder adapter beside it (prefix_encoder.safetensors), so
`armodal eval run=<dir>` captions the held-out images and reports the accuracy, comparable
with a code-token run's image -> text figure on the same split.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset, RandomSampler

from armodal.checkpoint import LoadedRun, instantiate_from_run, load_run, save_run
from armodal.data.datamodule import make_loader, make_train_loader
from armodal.data.multimodal_module import pad_rows
from armodal.data.paired import caption_digit
from armodal.generation import DecodingConfig, generate
from armodal.generation.generate import fit_to_context
from armodal.lit import IGNORE_INDEX, decay_groups, shift_targets
from armodal.model import ModelConfig, Transformer
from armodal.prefix import ImagePrefix, PrefixedModel
from armodal.resume import AtomicCheckpointIO, fit_resumable
from armodal.tokenizers.space import TokenSpace

__all__ = ["PrefixCaptioner", "train_prefix_captioner", "load_prefix_run", "caption_images",
           "prefix_caption_accuracy"]

ENCODER_WEIGHTS = "prefix_encoder.safetensors"
TEXT_MARKERS = {"text": ("<bot>", "<eot>")}


class CaptionPairs(Dataset):
    """Item i: {"images": (C, H, W) uint8, "tokens": (L,) int64 caption row}."""

    def __init__(self, images: Tensor, rows: Tensor) -> None:
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"images": self.images[i], "tokens": self.rows[i]}


class PrefixCaptioner(L.LightningModule):
    """Next-token loss on caption tokens, the image entering as prefix embeddings."""

    def __init__(self, model_config: ModelConfig, encoder: ImagePrefix, optimizer, scheduler,
                 pad_id: int) -> None:
        super().__init__()
        self.model, self.encoder = Transformer(model_config), encoder
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.pad_id = pad_id
        self.val_history: list[tuple[int, float]] = []

    def token_nll(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        inputs, targets = shift_targets(batch["tokens"], None, self.pad_id)
        logits = self.model(inputs, prefix=self.encoder(batch["images"]))  # (B, T, V)
        targets = targets.flatten()
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets,
                              ignore_index=IGNORE_INDEX, reduction="none")
        return nll, targets

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        nll, targets = self.token_nll(batch)
        loss = nll.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._sums = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        nll, targets = self.token_nll(batch)
        self._sums += torch.stack([nll.double().sum(), (targets != IGNORE_INDEX).sum().double()])

    def on_validation_epoch_end(self) -> None:
        loss = (self._sums[0] / self._sums[1]).item()
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, loss))
        self.log_dict({"val/loss": loss, "val/bits_per_byte": loss / math.log(2)}, prog_bar=True)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.parameters()))  # not a frozen codec
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.max_steps)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def caption_rows(tokenizer, space: TokenSpace, captions: list[str], length: int | None = None
                 ) -> Tensor:
    """(N, L) <bos> <bot> caption <eot> <eos> rows, right-padded."""
    rows = [space.pack([("text", tokenizer.encode(c))]) for c in captions]
    return pad_rows(rows, length or max(len(r) for r in rows), space.pad_id)


def train_prefix_captioner(cfg: DictConfig):
    """The `task: prefix_captioning` entry point of armodal.train.train."""
    from armodal.train import TrainResult, start_run

    start = time.perf_counter()
    run_dir = start_run(cfg)
    source = instantiate(cfg.domain.source, _convert_="object")
    tokenizer = instantiate(cfg.domain.tokenizer)
    train_set, val_set = source.split_sets()
    space = TokenSpace({"text": tokenizer.vocab_size}, TEXT_MARKERS)
    captions = [source.caption(y, i) for i, y in enumerate(train_set.labels.tolist())]
    val_captions = [source.caption(y, len(train_set) + i)
                    for i, y in enumerate(val_set.labels.tolist())]
    train_rows = caption_rows(tokenizer, space, captions)
    val_rows = caption_rows(tokenizer, space, val_captions, train_rows.shape[1])

    model_cfg = instantiate(cfg.model, vocab_size=space.vocab_size, max_seq_len=1)
    encoder = ImagePrefix(model_cfg.d_model, **cfg.domain.encoder,
                          image_size=tuple(train_set.images.shape[-2:]),
                          channels=train_set.images.shape[1])
    model_cfg = dataclasses.replace(model_cfg, max_seq_len=encoder.n_positions
                                    + train_rows.shape[1] - 1)
    module = PrefixCaptioner(model_cfg, encoder, instantiate(cfg.optim.optimizer),
                             instantiate(cfg.optim.scheduler), space.pad_id)
    batch = cfg.domain.data.batch_size
    train_data = CaptionPairs(train_set.images, train_rows)
    gen = torch.Generator().manual_seed(cfg.seed)
    train_loader = make_train_loader(train_data, RandomSampler(train_data, generator=gen),
                                     batch, 0, generator=gen)
    val_loader = make_loader(CaptionPairs(val_set.images, val_rows), batch, 0, shuffle=False)
    # The frozen codec encoder stays in eval mode on purpose (ImagePrefix keeps it there).
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start.*")
    loggers = [instantiate(c) for c in cfg.logger.values()]
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]  # checkpoints, exact resume
    trainer: L.Trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks,
                                     default_root_dir=str(run_dir), plugins=[AtomicCheckpointIO()])
    fit_resumable(trainer, module, run_dir, cfg.resume, train_dataloaders=train_loader,
                  val_dataloaders=val_loader)
    if not module.val_history or module.val_history[-1][0] != trainer.global_step:
        trainer.validate(module, dataloaders=val_loader, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    accuracy = prefix_caption_accuracy(module.model.eval(), module.encoder.eval(), tokenizer,
                                       space, val_set.images, val_set.labels)
    metrics["val/caption_accuracy"] = accuracy
    save_file({k: v.contiguous() for k, v in module.encoder.state_dict().items()},
              str(run_dir / ENCODER_WEIGHTS))
    save_run(run_dir, module.model, space, tokenizer, extra={
        "domain": cfg.domain.name,
        "prefix": {"kind": encoder.kind, "codec": encoder.codec_path,
                   "image_size": list(train_set.images.shape[-2:]),
                   "channels": int(train_set.images.shape[1])},
        "metrics": metrics, "steps": trainer.global_step,
        "train_config": OmegaConf.to_container(cfg, resolve=True),
    })
    losses = [loss for _, loss in module.val_history]
    result = TrainResult(run_dir, min(losses), losses[-1], metrics, trainer.global_step,
                         time.perf_counter() - start, module, trainer, None)
    print(f"\nrun finished in {result.seconds:.0f} s, {result.steps} steps: {run_dir}\n"
          f"  val loss {losses[-1]:.4f} nats/byte; held-out captions naming their digit "
          f"{accuracy:.1%} (greedy)\n  evaluate: armodal eval run={run_dir}")
    return result


def load_prefix_run(run_dir: str | Path, device: str = "cpu") -> tuple[LoadedRun, ImagePrefix]:
    """The transformer run and its encoder adapter."""
    run = load_run(run_dir, device)
    info = run.meta.get("prefix")
    if not info:
        raise ValueError(f"{run_dir} is not a prefix-captioning run (no 'prefix' in config.json)")
    encoder = ImagePrefix(run.model.config.d_model, kind=info["kind"], codec=info["codec"],
                          image_size=tuple(info["image_size"]), channels=info["channels"])
    encoder.load_state_dict(load_file(str(run.path / ENCODER_WEIGHTS)))
    return run, encoder.eval().to(device)


@torch.inference_mode()
def caption_images(model: Transformer, encoder: ImagePrefix, tokenizer, space: TokenSpace,
                   images: Tensor, max_new_tokens: int = 40, batch_size: int = 100) -> list[str]:
    """Greedy captions of (N, C, H, W) uint8 images, held to text ids and <eot>."""
    begin, end = (space.special_ids[n] for n in TEXT_MARKERS["text"])
    allowed = space.modality_mask("text", include=[TEXT_MARKERS["text"][1]])
    config = DecodingConfig(strategy="greedy", max_new_tokens=max_new_tokens,
                            stop_token_ids=(end,))
    texts = []
    for chunk in images.split(batch_size):
        prefixed = PrefixedModel(model, encoder(chunk))
        out = generate(prefixed, [[space.bos_id, begin]] * len(chunk),
                       fit_to_context(config, prefixed, 2), allowed_mask=allowed)
        texts += [tokenizer.decode(space.to_local("text", [t for t in seq if t != end]))
                  for seq in out.sequences]
    return texts


def prefix_caption_accuracy(model, encoder, tokenizer, space, images: Tensor, labels: Tensor
                            ) -> float:
    captions = caption_images(model, encoder, tokenizer, space, images)
    return sum(caption_digit(c) == y for c, y in zip(captions, labels.tolist())) / len(captions)


def evaluate_prefix_run(run_dir: str | Path) -> dict:
    """Caption the run's held-out images: accuracy and the examples' path."""
    run, encoder = load_prefix_run(run_dir)
    source = instantiate_from_run(run.meta["train_config"]["domain"]["source"], "domain.source")
    _, val = source.split_sets()
    captions = caption_images(run.model.eval(), encoder, run.tokenizer, run.space, val.images)
    right = [caption_digit(c) == y for c, y in zip(captions, val.labels.tolist())]
    out = run.path / "eval" / "prefix_captions.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(f"{y}\t{c}\n" for c, y in zip(captions, val.labels.tolist())))
    return {"image_to_text_accuracy": sum(right) / len(right), "captioned_images": len(right),
            "encoder": run.meta["prefix"]["kind"], "examples": str(out)}
