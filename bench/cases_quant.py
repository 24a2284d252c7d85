"""Weight-only quantization cases: weight memory, batch-1 decoding speed and held-out perplexity
of the int8 / int4 / bf16 target against the same target in fp32.

Each mode quantizes its own copy of the trained fp32 target (armodal.quantize.quantize_model).
Perplexity is exp of the mean next-token NLL over eval_batches x 8 windows spread over the
held-out code (corpus.held_out_nll), identical windows for every mode.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator

import torch
from cases_decode import rate_row
from context import Bench
from corpus import held_out_nll
from measure import measure
from report import Row, missing

from armodal.generation import DecodingConfig, generate

MODES = ("int8", "int4", "bf16")
FP32 = "armodal fp32"


def _quantized(bench: Bench) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """A quantized copy of the target per mode, and per mode why it could not be made."""
    try:
        from armodal.quantize import quantize_model
    except ImportError as err:
        return {}, {mode: f"armodal.quantize is not available ({err})" for mode in MODES}
    models, errors = {}, {}
    for mode in MODES:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                models[mode] = quantize_model(copy.deepcopy(bench.prep.target), mode)
            except Exception as err:
                errors[mode] = f"{type(err).__name__}: {err}".splitlines()[0][:160]
        for w in caught:  # e.g. int4 layers too narrow for the kernel, kept as int8
            print(f"note: quantize {mode}: {str(w.message)[:200]}", flush=True)
    return models, errors


def perplexity(model: torch.nn.Module, bench: Bench) -> float:
    s = bench.settings
    return math.exp(held_out_nll(model, bench.prep.corpus, s.eval_seq, s.eval_batches))


def quant_rows(bench: Bench) -> Iterator[Row]:
    models, errors = _quantized(bench)
    base = bench.prep.target
    for mode in MODES:  # a mode that failed gives n/a rows of every kind
        if mode in errors:
            for kind, unit in (("weight_mib", "MiB"), ("greedy_b1", "tokens/s"), ("ppl", "ppl")):
                yield missing(bench.name(f"quant_{mode}_{kind}"), f"{mode} {kind}", unit, FP32,
                              errors[mode])
    if not models:
        return
    from armodal.quantize import weight_bytes

    fp32_mib = weight_bytes(base) / 2 ** 20
    for mode, model in models.items():
        yield Row(bench.name(f"quant_{mode}_weight_mib"), f"{mode} weight memory", "MiB",
                  weight_bytes(model) / 2 ** 20, FP32, fp32_mib, "weights only")

    prompts = bench.prompts(1)
    config = DecodingConfig(strategy="greedy", max_new_tokens=bench.settings.new_tokens)
    sides = {"fp32": base, **models}
    done = measure({mode: (lambda m=m: generate(m, prompts, config)) for mode, m in sides.items()},
                   bench.settings.runs)
    for mode in models:
        yield rate_row(bench, f"quant_{mode}_greedy_b1", f"{mode} greedy b1", 1, done[mode],
                       done["fp32"], FP32)

    fp32_ppl = perplexity(base, bench)
    for mode, model in models.items():
        try:
            ppl = perplexity(model, bench)
        except Exception as err:
            yield missing(bench.name(f"quant_{mode}_ppl"), f"{mode} held-out perplexity", "ppl",
                          FP32, f"{type(err).__name__}: {err}".splitlines()[0][:160])
            continue
        yield Row(bench.name(f"quant_{mode}_ppl"), f"{mode} held-out perplexity", "ppl", ppl,
                  FP32, fp32_ppl, f"{100 * (ppl / fp32_ppl - 1):+.2f}% vs fp32")
