"""ARModule: next-token prediction with teacher forcing, as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from armodal.model import ModelConfig, Transformer

IGNORE_INDEX = -100
NONFINITE_MODES = ("skip", "stop")


def warmup_cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 100,
                  min_lr_ratio: float = 0.1) -> LambdaLR:
    """Linear warmup to the base LR, then cosine decay to min_lr_ratio * base LR at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"warmup_cosine needs total_steps > 0 (trainer.max_steps), "
                         f"got {total_steps}")
    warmup_steps = min(warmup_steps, total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def shift_targets(tokens: Tensor, loss_mask: Tensor | None, pad_id: int | None) -> tuple[Tensor, Tensor]:
    """Split (B, T+1) windows into inputs (B, T) and targets (B, T).

    Targets that are padding, or that loss_mask (B, T+1) marks False, become IGNORE_INDEX so
    they carry no loss (e.g. prompt positions a recipe does not want learned).
    """
    inputs, targets = tokens[..., :-1], tokens[..., 1:].clone()
    if pad_id is not None:
        targets[targets == pad_id] = IGNORE_INDEX
    if loss_mask is not None:
        targets[~loss_mask[..., 1:].bool()] = IGNORE_INDEX
    return inputs, targets


class ARModule(L.LightningModule):
    """Trains a Transformer on packed windows of global token ids.

    Batches are (B, T+1) int64 tensors, or dicts with "tokens" and an optional "loss_mask".
    `units_per_token` turns nats per token into bits per unit (bits per byte for text).
    `unit_ids` = (lo, hi): only targets with global ids in [lo, hi) count toward bits per unit,
    each standing for `units_per_token` units; e.g. an image's code tokens, so that structure
    tokens (<boi>, end of row, the class) stay out of bits per dimension. The loss and
    perplexity still cover every target.
    `nonfinite`: what a NaN / inf loss or gradient does: "skip" drops that step's update and
    counts it (`train/skipped_steps`), "stop" ends the run with FloatingPointError, leaving the
    last good checkpoint as it was.
    """

    def __init__(self, model_config: ModelConfig, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., LambdaLR] | None = None, pad_id: int | None = None,
                 units_per_token: float = 1.0, unit: str = "token", compile: bool = False,
                 unit_ids: tuple[int, int] | None = None, nonfinite: str = "skip"):
        super().__init__()
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r}; allowed: {', '.join(NONFINITE_MODES)}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self.model_config = model_config
        self.model = Transformer(model_config)
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.pad_id = pad_id
        self.units_per_token = units_per_token
        self.unit = unit
        self.unit_ids = tuple(unit_ids) if unit_ids is not None else None
        # Kept off the module tree: the compiled wrapper shares self.model's parameters, and
        # registering it would repeat every weight in the state dict under a second name.
        # Generation keeps calling the eager self.model, whose cache shapes vary by call.
        object.__setattr__(self, "forward_fn", torch.compile(self.model) if compile else self.model)
        self.val_history: list[tuple[int, float]] = []  # (global step, val loss) per validation
        self.bits_history: dict[int, float] = {}  # global step -> val bits per unit

    def forward(self, idx: Tensor) -> Tensor:
        return self.forward_fn(idx)

    def token_nll(self, batch: Tensor | dict) -> tuple[Tensor, Tensor]:
        """Per-target NLL (B*T,) (0 where not learned) and the targets (B*T,)."""
        tokens, loss_mask = (batch["tokens"], batch.get("loss_mask")) \
            if isinstance(batch, dict) else (batch, None)
        inputs, targets = shift_targets(tokens, loss_mask, self.pad_id)
        logits = self(inputs)  # (B, T, V)
        targets = targets.flatten()
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets, ignore_index=IGNORE_INDEX,
                              reduction="none")
        return nll, targets

    def loss(self, batch: Tensor | dict) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over learned targets, and the number of learned targets."""
        nll, targets = self.token_nll(batch)
        count = (targets != IGNORE_INDEX).sum()
        return nll.sum() / count.clamp(min=1), count

    def training_step(self, batch: Tensor | dict, batch_idx: int) -> Tensor | None:
        loss, _ = self.loss(batch)
        if not torch.isfinite(loss):
            return self._nonfinite(f"loss {loss.item()}")  # None: Lightning skips the update
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self._nonfinite("gradient")
            optimizer.zero_grad(set_to_none=True)  # no gradient, no update for this step

    def _nonfinite(self, what: str) -> None:
        if self.nonfinite == "stop":
            raise FloatingPointError(f"non-finite {what} at step {self.global_step}; the run "
                                     f"stops (nonfinite=stop; nonfinite=skip drops such steps). "
                                     f"The last checkpoint saved before it is kept.")
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps))

    def on_validation_epoch_start(self) -> None:
        # (all targets' NLL, their count, unit targets' NLL, their count)
        self._val_sums = torch.zeros(4, dtype=torch.float64)

    def validation_step(self, batch: Tensor | dict, batch_idx: int) -> None:
        # Sum NLL over tokens (not a mean of batch means) so the epoch figure is exact.
        nll, targets = self.token_nll(batch)
        self._val_sums += nll_sums(nll.detach(), targets, self.unit_ids).cpu()

    def on_validation_epoch_end(self) -> None:
        sums = self.all_gather(self._val_sums).reshape(-1, 4).sum(0)  # over processes
        total, count, unit_total, unit_count = sums
        nll = (total / count).item()
        bits = bits_per_unit(total, count, unit_total, unit_count, self.units_per_token,
                             self.unit_ids)
        if not self.trainer.sanity_checking:
            self.val_history.append((self.global_step, nll))
            self.bits_history[self.global_step] = bits
        self.log_dict({"val/loss": nll, "val/ppl": math.exp(min(nll, 50.0)),
                       f"val/bits_per_{self.unit}": bits}, prog_bar=True)

    def configure_optimizers(self):
        # Weight decay on matrices only; norms' gains are left alone, as in nanoGPT / Llama.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def nll_sums(nll: Tensor, targets: Tensor, unit_ids: tuple[int, int] | None) -> Tensor:
    """(4,) float64: summed NLL and count over learned targets, then over unit targets
    (targets in [lo, hi) of unit_ids; all learned targets when unit_ids is None)."""
    learned = targets != IGNORE_INDEX
    in_units = learned if unit_ids is None else (targets >= unit_ids[0]) & (targets < unit_ids[1])
    nll = nll.double()
    return torch.stack([nll[learned].sum(), learned.sum().double(), nll[in_units].sum(),
                        in_units.sum().double()])


def bits_per_unit(total: Tensor | float, count: Tensor | float, unit_total: Tensor | float,
                  unit_count: Tensor | float, units_per_token: float,
                  unit_ids: tuple[int, int] | None) -> float:
    """Bits per unit: over all targets (text: units_per_token averages bytes over every token,
    eos included), or over the unit targets only, each worth units_per_token units."""
    if unit_ids is None:
        return float(total / count / math.log(2) / units_per_token)
    return float(unit_total / (unit_count * units_per_token) / math.log(2))
