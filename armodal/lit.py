"""ARModule: next-token prediction with teacher forcing, as a LightningModule."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.lr_scheduler import LambdaLR

from armodal.modality_metrics import ModalityGroups
from armodal.model import ModelConfig, Transformer

IGNORE_INDEX = -100
NONFINITE_MODES = ("skip", "stop")
SS_SCHEDULES = ("linear", "exponential", "inverse_sigmoid")
SS_MODES = ("sample", "argmax")


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


@dataclass(frozen=True)
class ScheduledSampling:
    """Scheduled sampling for transformers (Mihaylova & Martins 2019): with probability eps per
    position, an input token is replaced by a teacher-forced first pass's prediction of it.

    eps(step) = eps_start + (eps_end - eps_start) * (1 - p(step)), where p is the teacher-forcing
    curve of Bengio et al. (2015): linear p = max(0, 1 - step / steps); exponential
    p = exp(-step / steps) (their k^i with k = e^(-1/steps)); inverse_sigmoid
    p = k / (k + exp(step / k)) with k >= 1 (p(0) = k / (k + 1), so eps starts a hair above
    eps_start). schedule None: off. mode: "sample" draws the replacement from
    softmax(logits / temperature), "argmax" takes the most likely token.
    """

    schedule: str | None = None
    eps_start: float = 0.0
    eps_end: float = 0.25
    steps: int = 10_000
    k: float = 1000.0
    mode: str = "sample"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        def real(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        problems = [
            (self.schedule is None or self.schedule in SS_SCHEDULES, "schedule",
             f"expected null or one of {', '.join(SS_SCHEDULES)}"),
            (real(self.eps_start) and 0 <= self.eps_start <= 1, "eps_start",
             "expected a number in [0, 1]"),
            (real(self.eps_end) and 0 <= self.eps_end <= 1, "eps_end",
             "expected a number in [0, 1]"),
            (isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps >= 1,
             "steps", "expected an integer >= 1"),
            (real(self.k) and self.k >= 1, "k", "expected a number >= 1"),
            (self.mode in SS_MODES, "mode", f"expected one of {', '.join(SS_MODES)}"),
            (real(self.temperature) and self.temperature > 0, "temperature", "expected > 0"),
        ]
        for ok, key, allowed in problems:
            if not ok:
                raise ValueError(f"scheduled_sampling.{key}={getattr(self, key)!r}: {allowed}")

    def eps(self, step: int) -> float:
        """The replacement probability at optimizer step `step`."""
        if self.schedule is None:
            return 0.0
        if self.schedule == "linear":
            teacher = max(0.0, 1.0 - step / self.steps)
        elif self.schedule == "exponential":
            teacher = math.exp(-step / self.steps)
        else:  # inverse_sigmoid; exp capped: p is 0 to double precision long before 700
            teacher = self.k / (self.k + math.exp(min(step / self.k, 700.0)))
        return self.eps_start + (self.eps_end - self.eps_start) * (1.0 - teacher)


def replace_inputs(inputs: Tensor, targets: Tensor, logits: Tensor, eps: float, mode: str,
                   temperature: float, content_ids: tuple[int, int] | None = None
                   ) -> tuple[Tensor, Tensor]:
    """The second pass's inputs: each eligible input position replaced with probability eps by
    the first pass's prediction of it. Returns (inputs (..., T), replaced (..., T) bool).

    inputs, targets (..., T): shift_targets' split, (B, T) or (B, K, T) (K streams: each stream
    slot is replaced on its own, from its own head; a column's K predictions all come from inputs
    before it, as in decoding). logits (..., T, V): the teacher-forced pass over `inputs`.
    Input t + 1 is target t, and logits at t predict it from inputs <= t, so a replacement never
    sees the token it replaces, nor any later one. Eligible: input t + 1 for every learned target
    t (not IGNORE_INDEX: no pads, no loss-masked structure such as an action run's observations)
    whose true id is in content_ids = [lo, hi) (None: any learned target); input 0 never is.
    Replacements are drawn from [lo, hi) only, as segment-constrained decoding would. Each
    position takes two uniforms (replace?, which token by inverse CDF) whatever the data, so the
    draws at t do not depend on tokens after t.
    """
    eligible = targets[..., :-1] != IGNORE_INDEX  # (..., T-1): target t = input t + 1
    lo, hi = content_ids if content_ids is not None else (0, logits.shape[-1])
    eligible &= (targets[..., :-1] >= lo) & (targets[..., :-1] < hi)
    coin, pick = torch.rand(2, *eligible.shape, device=inputs.device)
    replaced = eligible & (coin < eps)
    scores = logits[..., :-1, lo:hi][replaced].float()  # (M, hi - lo)
    if mode == "argmax":
        tokens = scores.argmax(-1)
    else:  # inverse CDF: the first id whose cumulative probability exceeds the uniform
        cdf = torch.softmax(scores / temperature, -1).cumsum(-1)
        tokens = torch.searchsorted(cdf, pick[replaced][:, None], right=True)[:, 0]
        tokens = tokens.clamp(max=hi - lo - 1)  # rounding can leave cdf[-1] a hair under 1
    mixed = inputs.clone()
    mixed[..., 1:][replaced] = tokens + lo
    return mixed, F.pad(replaced, (1, 0))


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
    `scheduled_sampling` (a ScheduledSampling or its fields; None or schedule None: off) trains
    on inputs partly replaced by the model's own predictions (see scheduled_inputs);
    `content_ids` = (lo, hi): only targets in [lo, hi) may be replaced (None: any learned one).
    `groups` (mixed-modality runs): per-modality loss weights for training, and validation
    metrics per modality (`val/loss_<modality>`, `val/bits_per_<unit>_<modality>`).
    """

    def __init__(self, model_config: ModelConfig, optimizer: Callable[..., torch.optim.Optimizer],
                 scheduler: Callable[..., LambdaLR] | None = None, pad_id: int | None = None,
                 units_per_token: float = 1.0, unit: str = "token", compile: bool = False,
                 unit_ids: tuple[int, int] | None = None, nonfinite: str = "skip",
                 scheduled_sampling: ScheduledSampling | Mapping | None = None,
                 content_ids: tuple[int, int] | None = None,
                 groups: ModalityGroups | None = None):
        super().__init__()
        self.groups = groups
        if isinstance(scheduled_sampling, Mapping):
            scheduled_sampling = ScheduledSampling(**scheduled_sampling)
        if scheduled_sampling is not None and scheduled_sampling.schedule is None:
            scheduled_sampling = None
        self.scheduled_sampling = scheduled_sampling
        self.content_ids = tuple(content_ids) if content_ids is not None else None
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

    def configure_model(self) -> None:
        # Lightning's ModelParallelStrategy hands over a device mesh: shard the model over it
        # (FSDP2 and / or tensor parallelism, armodal/parallel.py). Other strategies: no mesh.
        if self.device_mesh is not None:
            from armodal.parallel import parallelize

            parallelize(self.model, self.device_mesh)

    def token_nll(self, batch: Tensor | dict) -> tuple[Tensor, Tensor]:
        """Per-target NLL (B*T,) (0 where not learned) and the targets (B*T,)."""
        tokens, loss_mask = (batch["tokens"], batch.get("loss_mask")) \
            if isinstance(batch, dict) else (batch, None)
        inputs, targets = shift_targets(tokens, loss_mask, self.pad_id)
        if isinstance(batch, dict) and "inputs" in batch:  # scheduled sampling's mixed inputs
            inputs = batch["inputs"]
        logits = self(inputs)  # (B, T, V)
        targets = targets.flatten()
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets, ignore_index=IGNORE_INDEX,
                              reduction="none")
        return nll, targets

    def loss(self, batch: Tensor | dict) -> tuple[Tensor, Tensor]:
        """Mean cross-entropy over learned targets, and the number of learned targets."""
        nll, targets = self.token_nll(batch)
        count = (targets != IGNORE_INDEX).sum()
        if self.groups is not None:
            return self.groups.weighted_loss(nll, targets), count
        return nll.sum() / count.clamp(min=1), count

    def training_step(self, batch: Tensor | dict, batch_idx: int) -> Tensor | None:
        if self.scheduled_sampling is not None:
            eps = self.scheduled_sampling.eps(self.global_step)
            batch, replaced = self.scheduled_inputs(batch, eps)
            self.log_dict({"train/ss_eps": eps, "train/ss_replaced": replaced})
        loss, _ = self.loss(batch)
        if not torch.isfinite(loss):
            return self._nonfinite(f"loss {loss.item()}")  # None: Lightning skips the update
        # sync_dist: the mean over data-parallel ranks, the global batch's loss (one process: as is)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        return loss

    def scheduled_inputs(self, batch: Tensor | dict, eps: float) -> tuple[Tensor | dict, Tensor]:
        """The batch for the loss pass under scheduled sampling, and the fraction of learned
        targets whose input token was replaced.

        Costs one extra forward (no backward) per step: about +30% step time (+25% to +32%
        measured on CPU, model=tiny and small shapes), a forward being ~1/3 of a step. At eps = 0
        the batch comes back as it was, with no first pass and no random draw, so the run is
        bit-identical to teacher forcing. The returned dict keeps the true tokens (the loss
        targets) and adds "inputs", the mixed inputs the loss pass reads instead.
        """
        if eps == 0:
            return batch, torch.zeros(())
        tokens, loss_mask = (batch["tokens"], batch.get("loss_mask")) \
            if isinstance(batch, dict) else (batch, None)
        inputs, targets = shift_targets(tokens, loss_mask, self.pad_id)
        # First pass under no_grad (no graph, as if detached): the replacements are discrete
        # ids, so no gradient could flow through them anyway, and skipping the graph keeps the
        # pass's activations out of memory. The model stays in its training mode (dropout on).
        with torch.no_grad():
            logits = self(inputs)  # (B, T, V) or (B, K, T, V)
        ss = self.scheduled_sampling or ScheduledSampling()
        mixed, replaced = replace_inputs(inputs, targets, logits, eps, ss.mode, ss.temperature,
                                         self.content_ids)
        fraction = replaced.sum() / (targets != IGNORE_INDEX).sum().clamp(min=1)
        return {"tokens": tokens, "loss_mask": loss_mask, "inputs": mixed}, fraction

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
        if self.groups is not None:  # (G, 2): NLL and count per modality group
            self._group_sums = torch.zeros(len(self.groups.names), 2, dtype=torch.float64)

    def validation_step(self, batch: Tensor | dict, batch_idx: int) -> None:
        # Sum NLL over tokens (not a mean of batch means) so the epoch figure is exact.
        nll, targets = self.token_nll(batch)
        self._val_sums += nll_sums(nll.detach(), targets, self.unit_ids).cpu()
        if self.groups is not None:
            self._group_sums += self.groups.sums(nll.detach(), targets).cpu()

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
        if self.groups is not None:
            group_sums = self.all_gather(self._group_sums).reshape(-1, *self._group_sums.shape)
            self.log_dict(self.groups.metrics(group_sums.sum(0)))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(decay_groups(self.model.parameters()))
        if self.scheduler_factory is None:
            return optimizer
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else \
            int(self.trainer.estimated_stepping_batches)
        scheduler = self.scheduler_factory(optimizer, total_steps=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def decay_groups(parameters) -> list[dict]:
    """Optimizer groups: weight decay on matrices only; norms' gains are left alone, as in
    nanoGPT / Llama. Frozen parameters (requires_grad False) are left out."""
    params = [p for p in parameters if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2]},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


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
