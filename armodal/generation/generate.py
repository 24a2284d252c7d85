"""generate() and stream(): batched, KV-cached autoregressive decoding.

Ragged prompts are left-padded into one batch; pads carry position -1, so each row is
computed exactly as it would be alone (same positions, pads never attended). The prompt is
prefilled in one forward, then each step feeds one token per row. Without the cache the whole
sequence is re-run every step: the reference the cached path must equal.

Context policy: a full-attention model refuses prompt + max_new_tokens > max_seq_len with a
ValueError (see fit_to_context); a sliding-window model decodes past it with a rolling cache of
window size, since RoPE is relative and the window bounds every distance. With
config.attention_sinks any model decodes past it with a bounded sink cache (StreamingLLM: the
first positions plus a recent window, RoPE positions numbered inside the cache; KVCache.place).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from armodal.generation.checks import (
    Prompts,
    check_ids_in_vocab,
    check_mask,
    check_single_stream,
    id_lists,
)
from armodal.generation.config import DecodingConfig
from armodal.generation.processors import process_logits
from armodal.generation.sampling import RowSampler, guided_logits
from armodal.generation.speculative_stats import SpeculativeStats
from armodal.generation.stopping import StopChecker
from armodal.model import max_sink_slots

__all__ = ["GenerationOutput", "TokenEvent", "generate", "stream", "fit_to_context"]

@dataclass
class GenerationOutput:
    """What `generate` returns; lists are per output row, num_return_sequences rows per
    prompt, in prompt order.

    Attributes:
        sequences: the new tokens of each row (prompt excluded, stop token included).
        prompts: the prompt ids of each row.
        logprobs: per new token, its log-probability under the distribution it was chosen
            from: when sampling, the processed one (penalties, temperature, top-k, top-p, ...);
            when greedy or beam, the temperature-1 one after constraints and penalties.
        finish_reasons: "stop_token", "stop_sequence", "stop_string" or "length".
        top_logprobs: with config.top_logprobs = n, per token the n most likely (id, logprob).
        scores: beam search only: each returned hypothesis' length-penalised score.
        texts: when a `decode` function is given: each row's text, cut before a stop string.
        speculative: with config.speculative set, the call's acceptance figures.
    """

    sequences: list[list[int]]
    prompts: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    top_logprobs: list[list[list[tuple[int, float]]]] | None = None
    scores: list[float] | None = None
    texts: list[str] | None = None
    speculative: SpeculativeStats | None = None


@dataclass
class TokenEvent:
    """One produced token, as `stream` yields it."""

    row: int
    token: int
    logprob: float
    text: str  # newly releasable text (held back while a stop string may be forming)
    finish_reason: str | None  # set on the row's last token


def fit_to_context(config: DecodingConfig, model: nn.Module, prompt_len: int) -> DecodingConfig:
    """config with max_new_tokens cut to the room the prompt leaves in the model's context.

    Sliding-window models (rolling cache) and attention sinks (sink cache) decode past
    max_seq_len, so they are returned as is.
    """
    if model.config.sliding_window is not None or config.attention_sinks is not None:
        return config
    room = model.config.max_seq_len - prompt_len
    if room < 1:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in the model's context "
                         f"of {model.config.max_seq_len} tokens; shorten the prompt")
    if config.max_new_tokens <= room:
        return config
    return dataclasses.replace(config, max_new_tokens=room,
                               min_new_tokens=min(config.min_new_tokens, room))


def generate(model: nn.Module, prompts: Prompts, config: DecodingConfig, *,
             allowed_mask: Tensor | None = None, step_masks: Tensor | None = None,
             uncond_prompts: Prompts | None = None, seeds: Sequence[int | None] | None = None,
             decode: Callable[[list[int]], str] | None = None,
             on_token: Callable[[int, int], None] | None = None,
             draft: nn.Module | None = None) -> GenerationOutput:
    """Decode after each prompt; see `stream` for the arguments. Returns every row at once.

    on_token(row, token_id) is called as each token is produced (a streaming hook).
    """
    if config.strategy == "beam":
        from armodal.generation.beam import beam_search

        if step_masks is not None or uncond_prompts is not None:
            raise ValueError("strategy='beam' takes neither step_masks nor uncond_prompts; "
                             "use greedy or sampling for segment layouts and guidance")
        return beam_search(model, id_lists(prompts, model.config.vocab_size), config,
                           allowed_mask=allowed_mask).to_generation_output()
    # Streamed text is not wanted here: texts are decoded once, at the end.
    events = _run(model, prompts, config, allowed_mask, step_masks, uncond_prompts, seeds,
                  decode, stream_text=False, draft=draft)
    while True:
        try:
            event = next(events)
        except StopIteration as done:
            return done.value
        if on_token is not None:
            on_token(event.row, event.token)


def stream(model: nn.Module, prompts: Prompts, config: DecodingConfig, *,
           allowed_mask: Tensor | None = None, step_masks: Tensor | None = None,
           uncond_prompts: Prompts | None = None, seeds: Sequence[int | None] | None = None,
           decode: Callable[[list[int]], str] | None = None,
           draft: nn.Module | None = None) -> Generator[TokenEvent, None, GenerationOutput]:
    """Yield a TokenEvent per produced token; the generator's return value is the output.

    Args:
        model: a Transformer with n_streams == 1.
        prompts: id lists of any lengths (callers include bos), or a (B, T) int64 tensor.
        config: the decoding settings (strategy "beam" goes through `generate`).
        allowed_mask: bool (V,) for every row, or (P, V) per prompt: never generate outside.
        step_masks: bool (S, V), or (P, S, V) per prompt: the allowed tokens at each of the
            first S steps (segment layouts from TokenSpace.layout_masks); later steps free.
        uncond_prompts: one per prompt, for classifier-free guidance with config.cfg_scale;
            decoded alongside in the same batch and fed the same tokens.
        seeds: one per prompt, overriding config.seed: a request's samples depend only on its
            own seed, never on the rest of the batch.
        decode: new-token ids -> text; needed for stop strings, fills TokenEvent.text.
        draft: the draft model for config.speculative="draft": a Transformer over the same
            token ids (the same TokenSpace), typically ~10x smaller.
    """
    return (yield from _run(model, prompts, config, allowed_mask, step_masks, uncond_prompts,
                            seeds, decode, stream_text=True, draft=draft))


def _run(model, prompts, config, allowed_mask, step_masks, uncond_prompts, seeds, decode,
         stream_text: bool, draft=None) -> Generator[TokenEvent, None, GenerationOutput]:
    """stream()'s body; with stream_text=False events carry no text (no per-token decoding)."""
    vocab = model.config.vocab_size
    check_single_stream(model)
    if config.strategy == "beam":
        raise ValueError("strategy='beam' returns whole hypotheses: use generate(), not stream()")
    if config.stop_strings and decode is None:
        raise ValueError(f"stop_strings={config.stop_strings} need a decode function to turn "
                         "tokens into text; pass decode=")
    prompt_rows = id_lists(prompts, vocab)
    check_ids_in_vocab(config, vocab)
    n_prompts, n = len(prompt_rows), config.num_return_sequences
    guided = config.cfg_scale != 1.0
    if guided != (uncond_prompts is not None):
        raise ValueError(f"cfg_scale={config.cfg_scale} and uncond_prompts go together: "
                         "guidance needs one unconditional prompt per prompt, and a scale != 1")
    rows = [p for p in prompt_rows for _ in range(n)]  # R = P * n output rows
    feed = rows + ([p for p in id_lists(uncond_prompts, vocab) for _ in range(n)]
                   if guided else [])
    if guided and len(feed) != 2 * len(rows):
        raise ValueError(f"uncond_prompts has {len(feed) // n - n_prompts} prompts; "
                         f"expected one per prompt ({n_prompts})")
    if seeds is not None and len(seeds) != n_prompts:
        raise ValueError(f"seeds has {len(seeds)} entries; expected one per prompt ({n_prompts})")
    device = next(model.parameters()).device
    masks = _per_row_masks(allowed_mask, step_masks, n_prompts, n, vocab, device)
    models = [model]
    if config.speculative is not None or draft is not None:
        from armodal.generation.speculative import check_draft, speculative_decode

        check_draft(model, draft, config)
        if step_masks is not None:
            raise ValueError("step_masks (segment layouts) are not supported with speculative "
                             "decoding; set speculative=None")
        models += [draft] if draft is not None else []
    else:
        cache, prompt_len = _plan_cache(model, feed, config)
    sampler = None if config.is_greedy else RowSampler(
        [seeds[i // n] if seeds is not None else config.seed for i in range(len(rows))],
        [i % n for i in range(len(rows))], device)
    stops = StopChecker(config, decode)
    out = GenerationOutput([[] for _ in rows], rows, [[] for _ in rows],
                           ["length"] * len(rows),
                           [[] for _ in rows] if config.top_logprobs else None)
    stream_text = stream_text and decode is not None

    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.inference_mode():
            if config.speculative is not None:
                yield from speculative_decode(model, draft, rows, config, masks(0), sampler,
                                              stops, out, device, stream_text)
            else:
                yield from _decode(model, feed, len(rows), prompt_len, config, cache, masks,
                                   sampler, stops, out, device, stream_text)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    if decode is not None:
        out.texts = [stops.text(r) for r in range(len(rows))]
    return out


def _decode(model, feed, n_rows, prompt_len, config, cache, masks, sampler, stops, out, device,
            stream_text: bool) -> Iterator[TokenEvent]:
    """The step loop over one left-padded batch of `feed` rows (the first n_rows are outputs;
    the rest are their unconditional twins under guidance).

    With config.compile the prefill still runs eagerly (its length varies per request), and
    every single-token step after it goes through the compiled step, always with explicit
    positions (its graph has one shape for padded and unpadded batches alike)."""
    compiled = None
    if config.compile and cache is not None:
        # Imported here: torch.compile machinery is only touched when it is asked for.
        from armodal.generation.compiled import compiled_step

        compiled = compiled_step(model)
    idx, positions = _left_pad(feed, device)  # (B, T), (B, T) or None
    history = torch.where(positions >= 0, idx, -1) if positions is not None else idx.clone()
    next_pos = torch.tensor([len(p) for p in feed], device=device)  # (B,)
    step_input, done = idx, [False] * n_rows
    for step in range(config.max_new_tokens):
        if compiled is not None and step > 0:
            logits = compiled(step_input, cache, positions)[:, -1]  # (B, V)
        elif cache is not None:
            logits = model(step_input, cache, positions=positions)[:, -1]  # (B, V)
        else:
            full_pos = None if positions is None else _positions_from(history)
            logits = model(history.clamp(min=0), positions=full_pos)[:, -1]
        logits = guided_logits(logits.float(), n_rows, config.cfg_scale)  # (R, V)
        allowed = masks(step)
        logits = process_logits(logits, config, step, allowed, history=history[:n_rows],
                                prompt_len=prompt_len)
        if torch.isneginf(logits).all(dim=-1).any():
            raise ValueError(f"no token is allowed at step {step}: the allowed / step masks, "
                             "bans and the stop ids blocked by min_new_tokens remove the whole "
                             "vocabulary")
        logp = logits.log_softmax(dim=-1)  # (R, V)
        tokens = logits.argmax(-1) if sampler is None else sampler.sample(logp.exp())  # (R,)
        chosen = logp.gather(-1, tokens[:, None]).squeeze(-1)  # (R,)
        top = logp.topk(config.top_logprobs, dim=-1) if config.top_logprobs else None
        for row, (token, logprob) in enumerate(zip(tokens.tolist(), chosen.tolist())):
            if done[row]:
                continue
            out.sequences[row].append(token)
            out.logprobs[row].append(logprob)
            if top is not None:
                out.top_logprobs[row].append(list(zip(top.indices[row].tolist(),
                                                      top.values[row].tolist())))
            reason = stops.update(row, token)
            if reason is None and step == config.max_new_tokens - 1:
                reason = "length"
                stops.finish(row, reason)
            if reason is not None:
                done[row] = True
                out.finish_reasons[row] = reason
            text = stops.stream_text(row, final=reason is not None) if stream_text else ""
            yield TokenEvent(row, token, logprob, text, reason)
        if all(done):
            return
        fed = tokens.repeat(len(feed) // n_rows)[:, None]  # (B, 1): twins get the same token
        history = torch.cat([history, fed], 1)
        step_input = fed
        if positions is not None or compiled is not None:
            positions = next_pos[:, None].clone()
        next_pos += 1


def _plan_cache(model: nn.Module, feed: list[list[int]], config: DecodingConfig):
    """The cache for this request (None without use_cache) and the padded prompt length.

    config.compile needs a static cache, whose length its graph is specialised to: the length
    is rounded up to a bucket (compiled.cache_len) so requests of similar lengths share one
    graph, and a request only a rolling cache could hold is refused rather than run eagerly
    behind the caller's back."""
    c = model.config
    longest = max(len(p) for p in feed)
    total = longest + config.max_new_tokens
    if config.attention_sinks is not None:  # bounded: any length (config: cached, eager)
        slots = _sink_slots(model, config)
        if total <= slots:  # never outgrown: the static cache gives the same output, faster
            return model.new_cache(len(feed), total), longest
        return model.new_cache(len(feed), slots, sinks=config.attention_sinks), longest
    if total > c.max_seq_len and (c.sliding_window is None or not config.use_cache):
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} "
                         f"exceeds the model's max_seq_len={c.max_seq_len}; only a "
                         f"sliding-window model with use_cache, or attention_sinks, decodes "
                         f"past it")
    if not config.use_cache:
        return None, longest
    if total > c.max_seq_len and config.compile:
        raise ValueError(f"compile=True decodes over a static cache of at most max_seq_len="
                         f"{c.max_seq_len} positions; prompt of {longest} tokens + "
                         f"max_new_tokens={config.max_new_tokens} needs the sliding-window "
                         f"rolling cache, which runs eagerly: set compile=false, or ask for "
                         f"at most {c.max_seq_len - longest} new tokens")
    if total > c.max_seq_len:
        return model.new_cache(len(feed), rolling=True), longest
    if config.compile:
        from armodal.generation.compiled import cache_len

        return model.new_cache(len(feed), cache_len(total, c.max_seq_len)), longest
    return model.new_cache(len(feed), total), longest


def _sink_slots(model: nn.Module, config: DecodingConfig) -> int:
    """The sink cache's size, attention_sinks + cache_window (default: as many as allowed)."""
    sinks, limit = config.attention_sinks, max_sink_slots(model.config, config.attention_sinks)
    window = config.cache_window if config.cache_window is not None else limit - sinks
    if window < 1 or sinks + window > limit:
        raise ValueError(f"attention_sinks={sinks} + cache_window={window} = {sinks + window} "
                         f"cache slots; this model allows 1 <= cache_window and at most {limit} "
                         f"slots in all (max_seq_len={model.config.max_seq_len}, "
                         f"sliding_window={model.config.sliding_window})")
    return sinks + window


def _left_pad(rows: list[list[int]], device) -> tuple[Tensor, Tensor | None]:
    """(B, T) ids left-padded with 0, and positions (-1 on pads), None when no row is padded."""
    t = max(len(r) for r in rows)
    idx = torch.tensor([[0] * (t - len(r)) + r for r in rows], dtype=torch.long, device=device)
    if all(len(r) == t for r in rows):
        return idx, None
    positions = torch.tensor([[-1] * (t - len(r)) + list(range(len(r))) for r in rows],
                             dtype=torch.long, device=device)
    return idx, positions


def _positions_from(history: Tensor) -> Tensor:
    """Positions (B, L) of a left-padded history (-1 marks pads)."""
    real = history >= 0
    return torch.where(real, real.long().cumsum(1) - 1, -1)


def _per_row_masks(allowed: Tensor | None, step_masks: Tensor | None, n_prompts: int, n: int,
                   vocab: int, device) -> Callable[[int], Tensor | None]:
    """step -> bool (R, V) or (V,) of allowed tokens, combining both kinds of mask."""
    allowed = check_mask(allowed, "allowed_mask", False, n_prompts, vocab, n, device)
    steps = check_mask(step_masks, "step_masks", True, n_prompts, vocab, n, device)

    def at(step: int) -> Tensor | None:
        current = None if steps is None or step >= steps.shape[-2] else steps[..., step, :]
        if current is None:
            return allowed
        return current if allowed is None else current & allowed
    return at
