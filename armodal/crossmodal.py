"""Cross-modal generation: a mixed prompt in, the next segment out, in any modality.

    prompt segments ──encode──▶ <bos> seg ... seg <bo{m}> ──generate (masked to m)──▶ ids <eo{m}>
        ──decode──▶ text / (C, H, W) image / waveform

The segment being generated is held inside its modality's vocabulary: a fixed-length
modality (an image's codes) gets one mask per step, exactly its length and then its end
marker; a free-length one (text) may produce its ids or its end marker, which stops it. So even
an untrained model returns a well-formed segment. With decoding.cfg_scale != 1, each row is
guided against the same prompt with its conditioning segments emptied (their markers kept),
what a run trained with `cond_dropout` has seen.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from armodal.generation import DecodingConfig, generate
from armodal.generation.generate import fit_to_context
from armodal.tokenizers.multimodal import MultimodalTokenizer, Segment

__all__ = ["segment_prompt", "segment_masks", "next_segment"]


def segment_prompt(tokenizer: MultimodalTokenizer, segments: Sequence[Segment], modality: str,
                   empty: bool = False) -> list[int]:
    """Global ids: <bos>, the segments (emptied to their bare markers when `empty`), then the
    begin marker of `modality`, the segment to generate."""
    if empty:
        body = [i for m, _ in segments for i in tokenizer.markers(m)]
    else:
        body = tokenizer.encode(segments).tolist()
    return _opened(tokenizer, body, modality)


def _opened(tokenizer: MultimodalTokenizer, body: list[int], modality: str) -> list[int]:
    """<bos> body <bo{modality}>: a prompt ready for its next segment."""
    return [tokenizer.space.bos_id, *body, tokenizer.markers(modality)[0]]


def segment_masks(tokenizer: MultimodalTokenizer, modality: str
                  ) -> tuple[Tensor | None, Tensor | None, int | None]:
    """(step_masks (S, V) or None, allowed_mask (V,) or None, fixed length or None) that keep a
    generated `modality` segment inside its vocabulary and end it with its end marker."""
    space = tokenizer.space
    end_id = tokenizer.markers(modality)[1]
    length = tokenizer.segment_length(modality)
    if length is not None:
        masks = space.layout_masks([modality] * length + [end_id])
        return masks, None, length
    allowed = space.modality_mask(modality)
    allowed[end_id] = True
    return None, allowed, None


def next_segment(model: nn.Module, tokenizer: MultimodalTokenizer,
                 prompts: Sequence[Sequence[Segment]], modality: str, decoding: DecodingConfig,
                 seeds: Sequence[int | None] | None = None) -> list[tuple[Any, list[int]]]:
    """Continue each prompt (a list of segments; ragged lengths batch together) with one
    `modality` segment. Returns per prompt (decoded content, the segment's local ids).

    With decoding.seed set and no `seeds`, prompt i draws with seed + i, so repeating one prompt
    n times gives n different samples. A prompt that leaves no room for the segment in the
    model's context raises a ValueError naming both lengths.
    """
    if not prompts:
        raise ValueError("no prompts: give at least one list of segments")
    tokenizer.part(modality)  # a clear error for a modality the run has no tokenizer for
    for segments in prompts:
        for i, (m, _) in enumerate(segments):
            if m not in tokenizer.parts:
                raise ValueError(f"prompt segment {i} is {m!r}, but this run has no {m!r} "
                                 f"tokenizer; its modalities: {', '.join(tokenizer.parts)}")
    # every prompt's segments encoded in one call (an image codec: one batched encoder pass)
    ids = [_opened(tokenizer, body.tolist(), modality) for body in tokenizer.encode_many(prompts)]
    step_masks, allowed, length = segment_masks(tokenizer, modality)
    end_id = tokenizer.markers(modality)[1]
    longest = max(len(p) for p in ids)
    need = length + 1 if length is not None else 2
    if model.config.max_seq_len - longest < need:
        raise ValueError(f"the prompt is {longest} tokens; with a {modality} segment of "
                         f"{need} more it does not fit the model's context of "
                         f"{model.config.max_seq_len} tokens (shorten the prompt)")
    stops = tuple(dict.fromkeys((*decoding.stop_token_ids, end_id)))
    # A free-length segment holds at least one id (an empty clip would not decode).
    config = dataclasses.replace(decoding, stop_token_ids=stops, num_return_sequences=1,
                                 min_new_tokens=0 if length is not None else 1)
    if length is not None:
        config = dataclasses.replace(config, max_new_tokens=length + 1)
    config = fit_to_context(config, model, longest)
    if seeds is None and config.seed is not None:
        seeds = [config.seed + i for i in range(len(ids))]
    uncond = None
    if config.cfg_scale != 1.0:
        uncond = [segment_prompt(tokenizer, segments, modality, empty=True)
                  for segments in prompts]
    out = generate(model, ids, config, step_masks=step_masks, allowed_mask=allowed,
                   uncond_prompts=uncond, seeds=seeds)
    results = []
    for seq in out.sequences:
        body = [t for t in seq if t != end_id]
        local = tokenizer.space.to_local(modality, torch.tensor(body, dtype=torch.int64))
        results.append((tokenizer.decode_segment(modality, local), local.tolist()))
    return results
