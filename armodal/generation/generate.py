"""generate(): autoregressive decoding from the causal Transformer.

Ragged prompts are grouped by length and each group decodes as one batch, which is exact (no
padding, no position shifts); outputs are reassembled in the caller's order. With the KV cache
the prompt is prefilled in one forward and each step feeds one token; without it the whole
sequence is re-run every step, the reference the cached path must match.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from armodal.generation.config import DecodingConfig
from armodal.generation.processors import process_logits

__all__ = ["GenerationOutput", "generate", "fit_to_context"]

OnToken = Callable[[int, int], None]


@dataclass
class GenerationOutput:
    """What `generate` returns; every list is in the order of the input prompts.

    Attributes:
        sequences: the new tokens of each row (prompt excluded, stop token included).
        prompts: the prompt ids of each row.
        logprobs: per new token, its log-probability under the distribution it was chosen
            from: when sampling, the processed one (temperature, top-k, top-p applied); when
            greedy, the temperature-1 untruncated one. Both include the hard constraints
            (allowed_mask, stop ids blocked before min_new_tokens).
        finish_reasons: "stop" (produced a stop token) or "length" (hit max_new_tokens).
    """

    sequences: list[list[int]]
    prompts: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]


def generate(model: nn.Module, prompts: Sequence[Sequence[int]] | Tensor, config: DecodingConfig,
             allowed_mask: Tensor | None = None,
             on_token: OnToken | None = None) -> GenerationOutput:
    """Decode `config.max_new_tokens` (at most) new tokens after each prompt.

    Args:
        model: a Transformer with n_streams == 1 (called as model(idx) and model(idx, cache)).
        prompts: a list of non-empty id lists of any lengths, or a (B, T) int64 tensor.
            Callers include bos themselves.
        config: the decoding settings.
        allowed_mask: bool (V,) for every row or (B, V) per row; tokens outside it are never
            generated.
        on_token: streaming hook, called as on_token(row, token_id) as each token is produced,
            with `row` the index of the prompt.

    Raises ValueError for empty prompts, out-of-vocabulary prompt or stop ids, a request longer
    than the model's max_seq_len, a bad allowed_mask, or a multi-stream model.
    """
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    if model.config.n_streams != 1:
        raise ValueError(f"model has n_streams={model.config.n_streams}; multi-stream decoding "
                         "comes with stream patterns, only n_streams=1 is supported now")
    rows = _as_id_lists(prompts, vocab)
    if any(i >= vocab for i in config.stop_token_ids):
        raise ValueError(f"stop_token_ids={config.stop_token_ids} must be < the model's "
                         f"vocab_size={vocab}")
    longest = max(len(p) for p in rows)
    if longest + config.max_new_tokens > max_len:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} "
                         f"exceeds the model's max_seq_len={max_len}")
    device = next(model.parameters()).device
    mask = _check_allowed_mask(allowed_mask, len(rows), vocab, device)
    generator = None
    if config.seed is not None and not config.is_greedy:
        generator = torch.Generator(device=device).manual_seed(config.seed)

    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(rows):
        by_length.setdefault(len(p), []).append(i)

    n = len(rows)
    out = GenerationOutput([[] for _ in range(n)], rows, [[] for _ in range(n)], ["length"] * n)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for length in sorted(by_length):
                group = by_length[length]
                idx = torch.tensor([rows[i] for i in group], dtype=torch.long, device=device)
                group_mask = mask if mask is None or mask.dim() == 1 else mask[group]
                _decode_group(model, idx, group, config, group_mask, generator, on_token, out)
    finally:
        model.train(was_training)
    return out


def fit_to_context(config: DecodingConfig, model: nn.Module, prompt_len: int) -> DecodingConfig:
    """config with max_new_tokens cut to the room the prompt leaves in the model's context.

    Decoding past max_seq_len (a rolling window, attention sinks) is not supported yet, so
    callers that take a preset such as max_new_tokens=256 for a 64-token model use this.
    """
    room = model.config.max_seq_len - prompt_len
    if room < 1:
        raise ValueError(f"prompt of {prompt_len} tokens leaves no room in the model's context "
                         f"of {model.config.max_seq_len} tokens; shorten the prompt")
    if config.max_new_tokens <= room:
        return config
    return dataclasses.replace(config, max_new_tokens=room,
                               min_new_tokens=min(config.min_new_tokens, room))


def _decode_group(model: nn.Module, idx: Tensor, group: list[int], config: DecodingConfig,
                  mask: Tensor | None, generator: torch.Generator | None,
                  on_token: OnToken | None, out: GenerationOutput) -> None:
    """Decode one batch of equal-length prompts idx (B, T), writing rows `group` of `out`."""
    b, t = idx.shape
    stop_ids = set(config.stop_token_ids)
    cache = model.new_cache(b, t + config.max_new_tokens) if config.use_cache else None
    seq, step_input = idx, idx  # (B, T + step) full sequence, (B, T or 1) next model input
    done = [False] * b
    for step in range(config.max_new_tokens):
        # Finished rows are still computed (the cache advances every row together); their
        # tokens are simply not recorded.
        if cache is not None:
            logits = model(step_input, cache)[:, -1]  # (B, V)
        else:
            logits = model(seq)[:, -1]  # (B, V)
        logits = process_logits(logits.float(), config, step, mask)
        if torch.isneginf(logits).all(dim=-1).any():
            raise ValueError(f"no token is allowed at step {step}: allowed_mask and the "
                             f"stop ids blocked by min_new_tokens={config.min_new_tokens} "
                             "together remove the whole vocabulary")
        tokens, logprobs = _choose(logits, config.is_greedy, generator)  # (B,), (B,)
        for j, (token, logprob) in enumerate(zip(tokens.tolist(), logprobs.tolist())):
            if done[j]:
                continue
            row = group[j]
            out.sequences[row].append(token)
            out.logprobs[row].append(logprob)
            if on_token is not None:
                on_token(row, token)
            if token in stop_ids:
                done[j] = True
                out.finish_reasons[row] = "stop"
        if all(done):
            break
        step_input = tokens[:, None]  # (B, 1)
        if cache is None:
            seq = torch.cat([seq, step_input], dim=1)


def _choose(logits: Tensor, greedy: bool,
            generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Pick one token per row of logits (B, V); return tokens (B,) and their log-probs (B,)."""
    logp = logits.log_softmax(dim=-1)  # (B, V)
    if greedy:
        tokens = logits.argmax(dim=-1)
    else:
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _as_id_lists(prompts: Sequence[Sequence[int]] | Tensor, vocab: int) -> list[list[int]]:
    """Validate prompts and return them as plain lists of ints."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2 or prompts.dtype != torch.long:
            raise ValueError(f"prompt tensor must be (B, T) int64, got shape "
                             f"{tuple(prompts.shape)} dtype {prompts.dtype}")
        rows = prompts.tolist()
    else:
        rows = [[int(i) for i in p] for p in prompts]
    if not rows:
        raise ValueError("prompts is empty; pass at least one prompt")
    for r, p in enumerate(rows):
        if not p:
            raise ValueError(f"prompt {r} is empty; prompts need at least one token (e.g. bos)")
        bad = [i for i in p if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"prompt {r} has ids {bad[:5]} outside the vocabulary [0, {vocab})")
    return rows


def _check_allowed_mask(mask: Tensor | None, batch: int, vocab: int,
                        device: torch.device) -> Tensor | None:
    """Validate allowed_mask: bool (V,) or (B, V), at least one allowed token per row."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.shape not in ((vocab,), (batch, vocab)):
        raise ValueError(f"allowed_mask must be bool of shape ({vocab},) or ({batch}, {vocab}), "
                         f"got shape {tuple(mask.shape)} dtype {mask.dtype}")
    if not mask.any(dim=-1).all():
        raise ValueError("allowed_mask allows no token at all for some row")
    return mask.to(device)
