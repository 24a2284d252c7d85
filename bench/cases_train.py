"""Training-step cases: armodal's Transformer against transformers' LlamaForCausalLM.

One step = forward, the same next-token cross-entropy, backward and an AdamW update, fp32, on
the same weights (each side trains its own copy) and the same fixed batch of train_batch x
train_seq training windows. transformers runs with use_cache=False, as a training script would.

Model FLOPs per token follow PaLM's accounting: 6 N + 12 L d T, where N counts the parameters
that multiply activations (everything but the embedding lookup table; the output head counts),
L the layers, d the width and T the sequence length (attention's score and value matmuls,
forward and backward, counted as if unmasked). MFU = tokens/s x FLOPs per token / the measured
fp32 matmul peak printed on the machine line.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from cases_decode import memory_row
from context import Bench
from measure import measure
from report import Row, missing

from armodal.model import Transformer


def flops_per_token(model: Transformer, seq_len: int) -> float:
    c = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if name != "embed.weight")
    if c.tie_embeddings:  # the shared table is also the head's matmul
        n += model.embed.weight.numel()
    return 6 * n + 12 * c.n_layer * c.d_model * seq_len


def _step(model: torch.nn.Module, logits_of: Callable, batch: torch.Tensor) -> Callable[[], float]:
    """One fwd + bwd + AdamW step on `model`, as a callable (the optimizer lives in the closure)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    inputs, targets = batch[:, :-1], batch[:, 1:].flatten()

    def step() -> float:
        logits = logits_of(model, inputs)  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def train_rows(bench: Bench) -> Iterator[Row]:
    s = bench.settings
    batch = bench.prep.corpus.windows("train", s.train_batch, s.train_seq + 1,
                                      np.random.default_rng(1))
    ours = copy.deepcopy(bench.prep.target).train()
    theirs = copy.deepcopy(bench.hf).train()
    done = measure({
        "armodal": _step(ours, lambda m, x: m(x), batch),
        "transformers": _step(theirs, lambda m, x: m(input_ids=x, use_cache=False).logits, batch),
    }, s.runs)
    a, b = done["armodal"], done["transformers"]
    tokens = s.train_batch * s.train_seq
    shape = f"batch {s.train_batch}x{s.train_seq}, fp32, fwd+bwd+AdamW"
    if a.error:
        for name, unit in (("train_tokens_s", "tokens/s"), ("train_mfu", "%")):
            yield missing(bench.name(name), name, unit, "transformers", a.error)
        return
    rates = {k: None if v.error else tokens / v.seconds for k, v in done.items()}
    yield Row(bench.name("train_tokens_s"), "train step tokens/s", "tokens/s", rates["armodal"],
              "transformers", rates["transformers"], shape)
    flops = flops_per_token(bench.prep.target, s.train_seq)
    mfu = {k: None if r is None else 100 * r * flops / (bench.peak_fp32 * 1e9)
           for k, r in rates.items()}
    yield Row(bench.name("train_mfu"), "train MFU", "%", mfu["armodal"], "transformers",
              mfu["transformers"], f"{flops / 1e9:.3f} GFLOP/token, fp32 peak "
                                   f"{bench.peak_fp32:.0f} GFLOP/s")
    yield memory_row(bench, "train_peak_mib", "train step peak memory", a, b, "transformers")
