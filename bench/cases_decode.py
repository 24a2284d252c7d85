"""Decoding cases: armodal's generate() against transformers' generate() on the same weights.

tokens/s = returned rows x new tokens / median seconds (beams beyond the best one are not
counted). Sampling uses temperature 1 and top-k 50 on both sides. Greedy and beam rows say
whether both sides produced the same tokens. Speculative rows decode greedily, so their tokens
must equal plain greedy decoding. Draft-model speculation runs each library's defaults:
armodal 4 proposals a step, adapted up or down by acceptance; transformers' assisted generation
20 assistant tokens cut short by its dynamic confidence threshold (0.4), batch 1 only (it raises
otherwise). Prompt lookup runs the same settings on both sides: 10 proposals a step, from the
longest earlier match of the last 1-3 tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from context import Bench
from measure import Side, measure
from report import Row, missing

from armodal.generation import DecodingConfig, generate

HF_SAMPLING = dict(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
BEAMS = 4
LOOKUP_TOKENS, LOOKUP_NGRAM = 10, 3  # both sides: transformers' documented example, n-grams <= 3


def hf_generate(model, prompts: torch.Tensor, new_tokens: int, **options) -> list[list[int]]:
    """transformers' generate, new tokens only; no eos, so every row runs to full length."""
    with torch.inference_mode():
        out = model.generate(prompts, attention_mask=torch.ones_like(prompts),
                             max_new_tokens=new_tokens, pad_token_id=0, **options)
    return out[:, prompts.shape[1]:].tolist()


def ours(bench: Bench, prompts: torch.Tensor, **config) -> Callable[[], object]:
    """An armodal generate() call on the target; returns the whole GenerationOutput."""
    config = DecodingConfig(max_new_tokens=bench.settings.new_tokens, **config)
    draft = bench.prep.draft if config.speculative == "draft" else None
    return lambda: generate(bench.prep.target, prompts, config, draft=draft)


def peer(bench: Bench, prompts: torch.Tensor, **options) -> Callable[[], object]:
    return lambda: hf_generate(bench.hf, prompts, bench.settings.new_tokens, **options)


def agreement(a: list[list[int]], b: list[list[int]]) -> str:
    """'tokens equal', or how many rows agree and where the first one diverges."""
    if a == b:
        return "tokens equal"
    same = sum(x == y for x, y in zip(a, b))
    first = min(next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
                for x, y in zip(a, b) if x != y)
    return f"TOKENS DIFFER: {same}/{len(a)} rows equal, first divergence at step {first}"


def rate_row(bench: Bench, name: str, case: str, rows: int, a: Side, b: Side, peer_name: str,
             note: str = "") -> Row:
    """A tokens/s row from two measured sides (armodal first)."""
    if a.error:
        return missing(bench.name(name), case, "tokens/s", peer_name, f"armodal: {a.error}")
    tokens = rows * bench.settings.new_tokens
    if b.error:
        note = f"{note}; {peer_name} n/a: {b.error}".lstrip("; ")
    return Row(bench.name(name), case, "tokens/s", tokens / a.seconds, peer_name,
               None if b.error else tokens / b.seconds, note)


def sequences(output: object) -> list[list[int]]:
    return output if isinstance(output, list) else output.sequences


def decode_rows(bench: Bench) -> Iterator[Row]:
    """Greedy, sampling and beam search at each batch size; the largest greedy batch also
    gives the decoding peak-memory row."""
    s = bench.settings
    strategies = {
        "greedy": (dict(strategy="greedy"), dict(do_sample=False), s.batches),
        "sample": (dict(strategy="sample", temperature=1.0, top_k=50, seed=0), HF_SAMPLING,
                   s.batches),
        "beam": (dict(strategy="beam", num_beams=BEAMS, beam_length="hf"),
                 dict(do_sample=False, num_beams=BEAMS), s.beam_batches),
    }
    for strategy, (our_config, hf_options, batches) in strategies.items():
        for batch in batches:
            prompts = bench.prompts(batch)
            sides = measure({"armodal": ours(bench, prompts, **our_config),
                             "transformers": peer(bench, prompts, **hf_options)}, s.runs)
            a, b = sides["armodal"], sides["transformers"]
            note = ""
            if strategy != "sample" and not (a.error or b.error):
                note = agreement(sequences(a.output), b.output)
            label = f"{strategy}{BEAMS if strategy == 'beam' else ''} b{batch}"
            yield rate_row(bench, label.replace(" ", "_"), label, batch, a, b, "transformers",
                           note)
            if strategy == "greedy" and batch == max(batches):
                yield memory_row(bench, f"greedy_b{batch}_peak_mib",
                                 f"greedy b{batch} peak memory", a, b, "transformers")


def memory_row(bench: Bench, name: str, case: str, a: Side, b: Side, peer_name: str) -> Row:
    if a.error or a.peak_mib is None:
        return missing(bench.name(name), case, "MiB", peer_name,
                       a.error or "no /proc/self/clear_refs: peak RSS cannot be reset")
    return Row(bench.name(name), case, "MiB", a.peak_mib, peer_name, b.peak_mib,
               "peak RSS above pre-call RSS")


def ttft_rows(bench: Bench) -> Iterator[Row]:
    """Time to first token at batch 1: prefill of the prompt plus choosing one token."""
    prompts = bench.prompts(1)
    config = DecodingConfig(strategy="greedy", max_new_tokens=1)
    sides = measure({"armodal": lambda: generate(bench.prep.target, prompts, config),
                     "transformers": lambda: hf_generate(bench.hf, prompts, 1, do_sample=False)},
                    max(bench.settings.runs, 5))
    a, b = sides["armodal"], sides["transformers"]
    name, case = bench.name("ttft_b1"), f"time to first token b1 ({prompts.shape[1]}-token prompt)"
    if a.error:
        yield missing(name, case, "ms", "transformers", a.error)
        return
    yield Row(name, case, "ms", a.seconds * 1e3, "transformers",
              None if b.error else b.seconds * 1e3, "lower is better")


def spec_note(side: Side, plain: Side) -> str:
    stats = side.output.speculative
    note = f"acceptance {stats.acceptance_rate:.2f}, {stats.tokens_per_step:.2f} tokens/step"
    if not plain.error:
        note += "; vs plain: " + agreement(side.output.sequences, plain.output.sequences)
    return note


def _speculative_sides(bench: Bench, batch: int) -> dict[str, Callable[[], object]]:
    """Plain greedy, draft and lookup speculation; transformers' two at batch 1 only."""
    prompts = bench.prompts(batch)
    greedy = dict(strategy="greedy")
    sides = {
        "plain": ours(bench, prompts, **greedy),
        "draft": ours(bench, prompts, **greedy, speculative="draft", num_draft_tokens=4,
                      adaptive_draft=True),
        "lookup": ours(bench, prompts, **greedy, speculative="prompt_lookup",
                       num_draft_tokens=LOOKUP_TOKENS, adaptive_draft=False,
                       prompt_lookup_max_ngram=LOOKUP_NGRAM),
    }
    if batch == 1:
        sides["draft_peer"] = peer(bench, prompts, do_sample=False,
                                   assistant_model=bench.hf_draft)
        sides["lookup_peer"] = peer(bench, prompts, do_sample=False,
                                    prompt_lookup_num_tokens=LOOKUP_TOKENS,
                                    max_matching_ngram_size=LOOKUP_NGRAM)
    return sides


def speculative_rows(bench: Bench) -> Iterator[Row]:
    """Draft-model and prompt-lookup speculation: against transformers' assisted generation
    and prompt lookup at batch 1 (all it supports), and against armodal's plain greedy at 1, 8."""
    peer_names = {"draft": "transformers assisted", "lookup": "transformers prompt lookup"}
    for batch in (1, 8):
        done = measure(_speculative_sides(bench, batch), bench.settings.runs)
        plain = done["plain"]
        for kind in ("draft", "lookup"):
            side = done[kind]
            if not side.error and getattr(side.output, "speculative", None) is None:
                side.error = "generate() returned no speculative stats (not implemented yet)"
            note = "" if side.error else spec_note(side, plain)
            if batch == 1:
                hf, hf_note = done[f"{kind}_peer"], note
                if not (side.error or hf.error):
                    hf_note += "; vs transformers: " + agreement(side.output.sequences, hf.output)
                yield rate_row(bench, f"spec_{kind}_b1", f"speculative {kind} b1", 1, side, hf,
                               peer_names[kind], hf_note)
            elif kind == "draft":
                note += "; transformers assisted generation: batch 1 only"
            yield rate_row(bench, f"spec_{kind}_b{batch}_vs_plain",
                           f"speculative {kind} b{batch} vs plain", batch, side, plain,
                           "armodal plain", note)


def compile_rows(bench: Bench) -> Iterator[Row]:
    """The compiled single-token decode step against eager decoding, greedy."""
    if not bench.settings.compile_batches:
        yield missing(bench.name("compiled_greedy"), "compiled greedy", "tokens/s",
                      "armodal eager", "skipped at this size: compiling costs more than the "
                      "whole run")
    for batch in bench.settings.compile_batches:
        prompts = bench.prompts(batch)
        done = measure({"compiled": ours(bench, prompts, strategy="greedy", compile=True),
                        "eager": ours(bench, prompts, strategy="greedy")}, bench.settings.runs)
        a, b = done["compiled"], done["eager"]
        note = "" if a.error or b.error else \
            f"{agreement(a.output.sequences, b.output.sequences)}; first call " \
            f"{a.warmup_s:.1f} s (compiling)"
        yield rate_row(bench, f"compiled_greedy_b{batch}", f"compiled greedy b{batch}", batch,
                       a, b, "armodal eager", note)
