"""evaluate(run_dir): NLL, perplexity and bits per unit on the val split or any text (image
and audio runs: their val split)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from armodal.checkpoint import LoadedRun, instantiate_from_run, load_run
from armodal.data.audio_module import AudioDataModule
from armodal.data.image_module import ImageDataModule
from armodal.data.shards import build_or_load_shards
from armodal.data.sources import TextSource
from armodal.data.video_module import VideoDataModule
from armodal.lit import IGNORE_INDEX, bits_per_unit, nll_sums, shift_targets
from armodal.longcontext import extend_context


@dataclass
class EvalResult:
    nll: float  # nats per token
    ppl: float
    bits_per_unit: float
    unit: str
    tokens: int
    data: str
    context: int | None = None  # positions per scored window (text runs)
    # Text runs: NLL by position inside the window, in buckets as long as the trained context:
    # [{"from": 0, "to": 256, "nll": ..., "ppl": ...}, ...]. Past the trained length it shows
    # what the model makes of positions it never saw (context extension).
    by_position: list[dict] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def position_table(self) -> str:
        rows = [f"{'positions':>15} {'loss':>8} {'perplexity':>11}"]
        rows += [f"{b['from']:>7}-{b['to'] - 1:<7} {b['nll']:8.4f} {b['ppl']:11.3f}"
                 for b in self.by_position or []]
        return "\n".join(rows)


def evaluate(run_dir: str, data: str | None = None, pattern: str = "**/*", batch_size: int = 16,
             max_batches: int | None = None, device: str = "cpu",
             quantize: str | None = None, context: int | None = None,
             rope_scaling: str | None = None, rope_factor: float | None = None) -> EvalResult:
    """Score a run on its own val split (data=None) or on a file / folder / glob of text.

    quantize: score the run's model quantized on load (armodal.quantize.QUANT_MODES), to
    measure what quantization costs against the same call without it.
    context: positions per scored window (default: the trained context); past the trained
    length with rope_scaling linear | ntk | yarn (rope_factor default: context / trained) or
    with plain RoPE (None), see armodal.longcontext."""
    run = load_run(run_dir, device, quantize=quantize)
    extending = context is not None or rope_scaling is not None
    if run.tokenizer.modality in ("image", "audio") and extending:
        raise ValueError(f"context={context}, rope_scaling={rope_scaling!r}: only text runs are "
                         f"scored at another context; {run.tokenizer.modality} runs score whole "
                         f"sequences of their own length")
    config = run.model.config
    trained = config.rope_original_len or config.max_seq_len  # before any context extension
    if extending:
        extend_context(run.model, context or config.max_seq_len, rope_scaling, rope_factor)
    if run.tokenizer.modality in ("image", "audio"):
        if data is not None:
            raise ValueError(f"data={data!r}: {run.tokenizer.modality} runs are scored on their "
                             f"own val split; leave data unset")
        module = VideoDataModule if "video" in run.meta else \
            ImageDataModule if run.tokenizer.modality == "image" else AudioDataModule
        dm = module.for_run(run.meta["train_config"], run.tokenizer, run.space)
        dm.prepare_shards()
        return _evaluate_sequences(run, dm.val_sequences, dm.units(), batch_size, max_batches)
    if data is None:
        tokens, units_per_token, label = val_split_tokens(run)
    else:
        tokens, units_per_token = _encode_source(run, TextSource(data, pattern=pattern))
        label = data
    window = run.model.config.max_seq_len
    sums, counts = position_nll(run.model, torch.from_numpy(tokens.astype(np.int64)), window,
                                batch_size, max_batches)
    nll = sums.sum().item() / counts.sum().item()
    return EvalResult(nll, math.exp(min(nll, 50.0)), nll / math.log(2) / units_per_token,
                      run.tokenizer.unit, len(tokens), label, window,
                      position_buckets(sums, counts, trained))


def position_buckets(sums: torch.Tensor, counts: torch.Tensor, width: int) -> list[dict]:
    """Per-position NLL sums and counts (T,) pooled into buckets of `width` positions."""
    buckets = []
    for start in range(0, len(sums), width):
        nll = sums[start:start + width].sum().item() / counts[start:start + width].sum().item()
        buckets.append({"from": start, "to": min(start + width, len(sums)), "nll": nll,
                        "ppl": math.exp(min(nll, 50.0))})
    return buckets


@torch.inference_mode()
def _evaluate_sequences(run: LoadedRun, sequences: torch.Tensor, units: tuple,
                        batch_size: int, max_batches: int | None) -> EvalResult:
    """Exact bits per unit over val sequences (N, [K,] L) of an image or audio run: only the
    unit tokens (image codes, audio samples or codes) count, structure tokens and the pads of
    a stream pattern do not; the loss covers every learned target, as in training."""
    units_per_token, unit, unit_ids = units
    sums = torch.zeros(4, dtype=torch.float64)
    device = next(run.model.parameters()).device
    for i, batch in enumerate(sequences.split(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        inputs, targets = shift_targets(batch.to(device), None, run.space.pad_id)
        logits = run.model(inputs)  # (B, [K,] L-1, V)
        targets = targets.flatten()
        nll = F.cross_entropy(logits.flatten(0, -2).float(), targets, reduction="none",
                              ignore_index=IGNORE_INDEX)
        sums += nll_sums(nll, targets, unit_ids).cpu()
    total, count = sums[0].item(), int(sums[1].item())
    bits = bits_per_unit(*sums, units_per_token, unit_ids)
    return EvalResult(total / count, math.exp(min(total / count, 50.0)), bits, unit, count,
                      "val split")


def val_split_tokens(run: LoadedRun) -> tuple[np.ndarray, float, str]:
    domain = run.meta["train_config"]["domain"]
    source = instantiate_from_run(domain["source"], "domain.source")
    data = domain["data"]
    # Same cache key as training (the fitted tokenizer state is not part of it): no re-tokenizing.
    shards = build_or_load_shards(source, run.tokenizer, run.space,
                                  cache_dir=data["cache_dir"], val_fraction=data["val_fraction"],
                                  split=data["split"], seed=run.meta["train_config"]["seed"])
    return np.asarray(shards.val), shards.units_per_token("val"), "val split"


def _encode_source(run: LoadedRun, source: TextSource) -> tuple[np.ndarray, float]:
    ids, units = [], 0
    for _, text in source.documents():
        local = run.tokenizer.encode(text)
        ids.append(run.space.to_global(run.tokenizer.modality, local).numpy())
        ids.append(np.array([run.space.eos_id]))
        units += run.tokenizer.count_units(text)
    tokens = np.concatenate(ids)
    return tokens, units / len(tokens)


def mean_nll(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int,
             max_batches: int | None = None) -> float:
    """Mean next-token NLL over non-overlapping windows of seq_len + 1 tokens."""
    sums, counts = position_nll(model, tokens, seq_len, batch_size, max_batches)
    return sums.sum().item() / counts.sum().item()


@torch.inference_mode()
def position_nll(model: torch.nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int,
                 max_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token NLL (seq_len,) float64 and token counts (seq_len,) by position inside
    non-overlapping windows of seq_len + 1 tokens."""
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows == 0:
        raise ValueError(f"evaluation data has {len(tokens)} tokens; at least "
                         f"{seq_len + 1} (one context window + 1) are needed")
    windows = tokens[: n_windows * seq_len + 1].unfold(0, seq_len + 1, seq_len)  # (N, T+1)
    device = next(model.parameters()).device
    sums = torch.zeros(seq_len, dtype=torch.float64)
    counts = torch.zeros(seq_len, dtype=torch.long)
    for i, batch in enumerate(windows.split(batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        batch = batch.to(device)
        logits = model(batch[:, :-1])  # (B, T, V)
        nll = F.cross_entropy(logits.transpose(1, 2).float(), batch[:, 1:],
                              reduction="none")  # (B, T)
        sums += nll.sum(0).double().cpu()
        counts += len(batch)
    return sums, counts
