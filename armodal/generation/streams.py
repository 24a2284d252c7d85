"""generate_codes(): decoding K parallel code streams laid out by a stream pattern.

The sequence the model sees is `prefix` columns (e.g. <bos> <boa> on every stream) followed by
the pattern's layout of the codes. Each model step yields one column of `n_streams` ids: every
slot of it is either empty (the pad id, never sampled), given (a frame of the prompt, teacher
forced) or sampled inside its level's id range. The leading columns that are wholly given are
prefilled in one forward with the prefix; then each step feeds one column through the KV cache.
Without the cache the whole sequence is re-run every step: the reference the cached path must
equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from armodal.generation.config import DecodingConfig
from armodal.generation.processors import process_logits
from armodal.generation.sampling import RowSampler
from armodal.tokenizers.patterns import StreamPattern

__all__ = ["generate_codes"]


def generate_codes(model: nn.Module, prefix: Tensor, pattern: StreamPattern, n_frames: int,
                   config: DecodingConfig, *, code_offset: int, fill_id: int,
                   prompt_codes: Tensor | None = None, seeds: Sequence[int | None] | None = None,
                   use_cache: bool | None = None,
                   on_step: Callable[[int, int], None] | None = None) -> Tensor:
    """Generate n_frames frames of K-level codes after `prefix`; returns (B, K, n_frames) int64
    local codes in [0, codebook_size).

    Args:
        model: a Transformer with n_streams == pattern.n_streams.
        prefix: (B, n_streams, P) global ids before the codes (P >= 1); (B, P) when n_streams=1.
        pattern: how the K levels are laid out into model steps (tokenizers.patterns).
        n_frames: frames to return, prompt frames included.
        config: greedy or sample, with temperature / top-k / top-p / min-p / typical / penalties
            (penalties count ids per stream). max_new_tokens and stop ids play no part: the
            layout fixes the length and only code ids are allowed.
        code_offset: the global id of local id 0 of the pattern's stream vocabulary.
        fill_id: the global id of empty slots (the TokenSpace's pad), as in training.
        prompt_codes: (B, K, Tp) local codes to continue: every slot of a frame < Tp is forced
            to the prompt's code, and the remaining frames are generated.
        seeds: one per row, overriding config.seed; stream j of row b draws from its own
            generator, so a row's codes depend only on its seed, never on the batch.
        use_cache: overrides config.use_cache.
        on_step: on_step(done, total) after each generated column (a progress hook).

    Forward passes: one per generated column, the first being the prefill of the prefix and
    the prompt's leading columns (the last column is never fed back). Under delay that is
    n_frames + K - 1 forwards without a prompt, and n_frames - Tp + K - 1 with one: never
    n_frames * K, as flattening the same codes would take.
    """
    prefix, prompt_codes = _check_request(model, prefix, pattern, n_frames, config, code_offset,
                                          fill_id, prompt_codes, seeds)
    batch, n_prompt = prefix.shape[0], prompt_codes.shape[-1]
    if n_prompt == n_frames:
        return prompt_codes.clone()  # nothing left to generate
    device = next(model.parameters()).device
    prefix, prompt_codes = prefix.to(device), prompt_codes.to(device)
    plan = _Plan(pattern, n_frames, n_prompt, code_offset, fill_id, model.config.vocab_size,
                 device)
    # Layout of what is known in advance: the prompt's frames and the empty slots.
    padded = torch.zeros(batch, pattern.n_levels, n_frames, dtype=torch.long, device=device)
    padded[..., :n_prompt] = prompt_codes
    given = pattern.apply(padded + code_offset, fill=fill_id)  # (B, S, L)
    sampler = None if config.is_greedy else RowSampler(
        [seeds[b] if seeds is not None else config.seed
         for b in range(batch) for _ in range(pattern.n_streams)],
        [j for _ in range(batch) for j in range(pattern.n_streams)], device)
    cached = config.use_cache if use_cache is None else use_cache
    mode = model.training
    model.eval()
    try:
        with torch.inference_mode():
            seq = _decode(model, prefix, given, plan, config, sampler, cached, on_step)
    finally:
        model.train(mode)
    return pattern.revert(seq[..., prefix.shape[-1]:]) - code_offset


class _Plan:
    """Per-column facts of one layout: which slots are given and which ids each may take."""

    def __init__(self, pattern: StreamPattern, n_frames: int, n_prompt: int, code_offset: int,
                 fill_id: int, vocab: int, device):
        frames = pattern.slot_frames(n_frames).to(device)  # (S, L)
        self.given = frames < n_prompt  # (S, L): empty (-1) or a prompt frame
        # The leading columns wholly given are prefilled; generation starts at the first
        # column with a slot to sample.
        self.start = int(self.given.all(0).long().cumprod(0).sum())
        self.length = frames.shape[1]
        self._ids = torch.arange(vocab, device=device)
        self._fill = fill_id
        self._size = pattern.codebook_size
        self._empty = frames < 0
        # Laying out all-zero codes gives each slot the global id of its level's code 0.
        zeros = torch.zeros(pattern.n_levels, n_frames, dtype=torch.long, device=device)
        self._low = pattern.apply(zeros + code_offset, fill=fill_id)  # (S, L)

    def allowed(self, column: int) -> Tensor:
        """Bool (S, V): the ids each stream may take at `column`; an empty slot only the fill
        id, so no row is all False."""
        ids, low = self._ids, self._low[:, column, None]  # (V,), (S, 1)
        in_range = (ids >= low) & (ids < low + self._size)
        return torch.where(self._empty[:, column, None], ids == self._fill, in_range)


def _decode(model, prefix: Tensor, given: Tensor, plan: _Plan, config: DecodingConfig,
            sampler: RowSampler | None, cached: bool,
            on_step: Callable[[int, int], None] | None) -> Tensor:
    """The step loop; returns the whole sequence (B, S, P + L) of global ids."""
    batch, n_streams, n_prefix = prefix.shape
    seq = torch.cat([prefix, given[..., :plan.start]], -1)  # (B, S, P + start)
    cache = model.new_cache(batch, n_prefix + plan.length - 1) if cached else None
    logits = _last_logits(model, seq, cache)  # (B, S, V)
    total = plan.length - plan.start
    for done, column in enumerate(range(plan.start, plan.length), start=1):
        flat = logits.reshape(batch * n_streams, -1)  # (B*S, V)
        allowed = plan.allowed(column).repeat(batch, 1)  # (B*S, V)
        flat = process_logits(flat, config, column - plan.start, allowed,
                              history=seq.reshape(batch * n_streams, -1),
                              prompt_len=n_prefix + plan.start)
        free = ~plan.given[:, column].repeat(batch)  # (B*S,) slots to sample
        if torch.isneginf(flat[free]).all(dim=-1).any():
            raise ValueError(f"no code is allowed at step {column}: banned_token_ids / "
                             "allowed_token_ids remove a level's whole code range")
        # Given slots are overwritten below; a config banning the pad id must not leave them
        # all -inf (NaN probabilities), so they draw from a harmless flat row instead.
        flat = torch.where(free[:, None], flat, 0.0)
        if sampler is None:
            tokens = flat.argmax(-1)
        else:
            tokens = sampler.sample(flat.softmax(-1))
        tokens = tokens.view(batch, n_streams)
        tokens = torch.where(plan.given[:, column], given[..., column], tokens)  # (B, S)
        seq = torch.cat([seq, tokens[..., None]], -1)
        if on_step is not None:
            on_step(done, total)
        if column + 1 < plan.length:
            logits = _last_logits(model, tokens[..., None] if cached else seq, cache)
    return seq


def _last_logits(model: nn.Module, ids: Tensor, cache) -> Tensor:
    """Logits (B, S, V) for the column after ids (B, S, T), one forward."""
    if ids.shape[1] == 1:
        return model(ids[:, 0], cache)[:, -1:].float()  # (B, 1, V)
    return model(ids, cache)[:, :, -1].float()  # (B, S, V)


def _check_request(model, prefix, pattern, n_frames, config, code_offset, fill_id,
                   prompt_codes, seeds) -> tuple[Tensor, Tensor]:
    """Every refusal, before any compute; returns prefix (B, S, P) and prompt (B, K, Tp)."""
    c = model.config
    if c.n_streams != pattern.n_streams:
        raise ValueError(f"model has n_streams={c.n_streams} but the {pattern.kind} pattern with "
                         f"{pattern.n_levels} levels needs n_streams={pattern.n_streams}")
    _check_config(config)
    if not (isinstance(n_frames, int) and n_frames >= 1):
        raise ValueError(f"n_frames must be an int >= 1, got {n_frames!r}")
    if not isinstance(prefix, Tensor) or prefix.dtype != torch.long:
        raise ValueError(f"prefix must be an int64 tensor, got {type(prefix).__name__} "
                         f"{getattr(prefix, 'dtype', '')}")
    if prefix.dim() == 2 and c.n_streams == 1:
        prefix = prefix[:, None]
    if prefix.dim() != 3 or prefix.shape[1] != c.n_streams or prefix.shape[2] < 1 \
            or prefix.shape[0] < 1:
        raise ValueError(f"prefix must have shape (B, {c.n_streams}, P) with B, P >= 1 (e.g. "
                         f"<bos> on every stream), got {tuple(prefix.shape)}")
    _check_ids("prefix", prefix, 0, c.vocab_size, "the model's vocabulary")
    if not 0 <= fill_id < c.vocab_size:
        raise ValueError(f"fill_id={fill_id} is outside the model's vocabulary "
                         f"[0, {c.vocab_size})")
    if not (0 <= code_offset and code_offset + pattern.vocab_size <= c.vocab_size):
        raise ValueError(f"code_offset={code_offset} puts the pattern's {pattern.vocab_size} "
                         f"ids outside the model's vocabulary [0, {c.vocab_size})")
    total = prefix.shape[-1] + pattern.length(n_frames)
    if total > c.max_seq_len:
        raise ValueError(f"prefix of {prefix.shape[-1]} steps + {n_frames} frames "
                         f"({pattern.length(n_frames)} {pattern.kind} steps) = {total} exceeds "
                         f"the model's max_seq_len={c.max_seq_len}")
    batch = prefix.shape[0]
    if seeds is not None and len(seeds) != batch:
        raise ValueError(f"seeds has {len(seeds)} entries; expected one per row ({batch})")
    if prompt_codes is None:
        return prefix, torch.zeros(batch, pattern.n_levels, 0, dtype=torch.long)
    if not isinstance(prompt_codes, Tensor) or prompt_codes.dtype != torch.long or \
            prompt_codes.dim() != 3 or prompt_codes.shape[:2] != (batch, pattern.n_levels):
        raise ValueError(f"prompt_codes must be int64 (B={batch}, K={pattern.n_levels}, Tp), "
                         f"got {getattr(prompt_codes, 'dtype', type(prompt_codes).__name__)} "
                         f"{tuple(getattr(prompt_codes, 'shape', ()))}")
    if prompt_codes.shape[-1] > n_frames:
        raise ValueError(f"prompt_codes has {prompt_codes.shape[-1]} frames, more than "
                         f"n_frames={n_frames}")
    _check_ids("prompt_codes", prompt_codes, 0, pattern.codebook_size, "the codebook")
    return prefix, prompt_codes


def _check_ids(name: str, ids: Tensor, low: int, high: int, what: str) -> None:
    bad = ids[(ids < low) | (ids >= high)].unique()
    if bad.numel():
        raise ValueError(f"{name} has ids {bad[:5].tolist()} outside {what} [{low}, {high})")


def _check_config(config: DecodingConfig) -> None:
    """DecodingConfig options that have no meaning for fixed-length code layouts."""
    refusals = [
        (config.strategy == "beam", "strategy='beam' is not supported for multi-stream code "
         "generation; use 'greedy' or 'sample'"),
        (config.cfg_scale != 1.0, f"cfg_scale={config.cfg_scale} is not supported here (no "
         "unconditional prefix); use 1"),
        (config.speculative is not None, f"speculative={config.speculative!r} is not supported "
         "for multi-stream code generation; use None"),
        (config.compile, "compile=True is not supported for multi-stream code generation"),
        (config.attention_sinks is not None, f"attention_sinks={config.attention_sinks} is not "
         "supported for multi-stream code generation (fixed-length layouts); use None"),
        (config.num_return_sequences != 1, f"num_return_sequences="
         f"{config.num_return_sequences} is not supported; repeat the prefix rows instead"),
        (config.top_logprobs != 0, f"top_logprobs={config.top_logprobs} is not supported; "
         "generate_codes returns codes only"),
    ]
    for refused, message in refusals:
        if refused:
            raise ValueError(message)
