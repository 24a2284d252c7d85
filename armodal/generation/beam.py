"""Beam search with Hugging Face transformers' exact semantics (checked against 5.x).

All prompts are searched in one batch of prompts x num_beams rows sharing one KV cache (the
left-padded prompts are prefilled once, each prompt's row is copied to its num_beams rows, and
rows are reordered to the surviving beams' parents after every step). Each prompt's search is
exactly what it would be alone: per-row positions hide the padding, and a prompt whose search
has ended keeps its hypotheses while the others go on.

Per step, as in HF's `_beam_search`:
  1. log-probs = log_softmax(processed logits); candidates = beam score + log-prob over all
     num_beams * V continuations; keep the top K = max(2, 1 + len(stop_token_ids)) * num_beams,
     so that num_beams unfinished candidates survive even if the best ones all stop.
  2. A candidate "hits" when its token is a stop id, its new tokens end with a stop sequence,
     or it reaches max_new_tokens. Hits among the first num_beams candidates (by summed
     log-prob, not by score) become finished hypotheses with
         score = sum_logprobs / length ** length_penalty;
     the pool keeps the num_beams best. Hits ranked below num_beams are dropped.
  3. The num_beams best candidates that did not hit are the next beams. At max length every
     candidate hits, so the top num_beams candidates of the last step join the pool.
  4. Stop when every candidate hits, or, with early_stopping=True, once the pool holds
     num_beams hypotheses, or when the best beam cannot beat the worst pooled hypothesis
     (a full pool is required), estimated as best_beam_sum / L ** length_penalty with
     L = the beams' current length, or L = max_new_tokens for early_stopping="never" with
     length_penalty > 0 (HF's heuristic, not a true bound when length_penalty > 0).
HF's -1e9 sentinels (initial extra beams, blocked candidates) are reproduced as is, so the
arithmetic and tie-breaking match token for token.

Length in the penalty:
  - "hf": what transformers 5.x uses for decoder-only models: `cur_len + 1 - prompt_len`,
    i.e. the number of new tokens, the stop token included, the prompt excluded.
  - "generated": new tokens including the stop token. In transformers 5.x this is the same
    number, so both settings give identical results. Older 4.x BeamSearchScorer releases
    counted otherwise (early ones the whole sequence, prompt included); "hf" tracks 5.x.

Log-probs are log_softmax of the logits after `process_logits` (hard constraints and
penalties), so they are renormalised over the allowed tokens. HF instead applies its
processors to the log-probs (-inf without renormalising), so with constraints that remove
probability mass (min_new_tokens, masks, penalties) scores differ from HF; without them
they are identical.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from armodal.generation.checks import (
    check_ids_in_vocab,
    check_mask,
    check_single_stream,
    id_lists,
)
from armodal.generation.config import DecodingConfig
from armodal.generation.generate import GenerationOutput
from armodal.generation.processors import process_logits

__all__ = ["BeamOutput", "beam_search"]

BLOCK = -1.0e9  # HF's "never pick this" offset; kept rather than -inf for identical ties
REASONS = ("length", "stop_token", "stop_sequence")  # GenerationOutput's finish reasons


@dataclass
class BeamOutput:
    """The n-best hypotheses of every prompt, prompt-major, best first: rows
    i*n .. i*n + n - 1 belong to prompt i (n = num_return_sequences).

    Attributes:
        sequences: new tokens of each hypothesis (prompt excluded, stop token included).
        prompts: the prompt of each row (repeated n times).
        logprobs: per new token, its log-prob under the processed distribution.
        finish_reasons: "stop_token", "stop_sequence" or "length".
        scores: the length-penalised scores beams are ranked by.
        sum_logprobs: the summed log-probs (the score before the length penalty).
    """

    sequences: list[list[int]]
    prompts: list[list[int]]
    logprobs: list[list[float]]
    finish_reasons: list[str]
    scores: list[float]
    sum_logprobs: list[float]

    def to_generation_output(self) -> GenerationOutput:
        """The same rows as a GenerationOutput (with `scores` if that class has the field)."""
        names = {f.name for f in dataclasses.fields(GenerationOutput)}
        kw = {name: getattr(self, name) for name in names if hasattr(self, name)}
        return GenerationOutput(**kw)


def beam_search(model: nn.Module, prompts: Sequence[Sequence[int]], config: DecodingConfig,
                allowed_mask: Tensor | None = None) -> BeamOutput:
    """The `config.num_return_sequences` best beam-search hypotheses of every prompt.

    Args:
        model: a Transformer with n_streams == 1.
        prompts: non-empty id lists of any lengths (callers include bos).
        config: num_beams, length_penalty, early_stopping, beam_length, stop ids / sequences,
            min_new_tokens, max_new_tokens and the logit constraints are used.
        allowed_mask: bool (V,) for every prompt or (len(prompts), V) per prompt.

    Raises ValueError for empty or out-of-vocabulary prompts or stop ids, a prompt +
    max_new_tokens longer than the model's max_seq_len, or a bad allowed_mask.
    """
    vocab, max_len = model.config.vocab_size, model.config.max_seq_len
    check_single_stream(model)
    rows = id_lists(prompts, vocab)
    for r, p in enumerate(rows):
        if len(p) + config.max_new_tokens > max_len:
            raise ValueError(f"prompt {r} of {len(p)} tokens + max_new_tokens="
                             f"{config.max_new_tokens} exceeds the model's max_seq_len={max_len}")
    check_ids_in_vocab(config, vocab)
    allowed_mask = check_mask(allowed_mask, "allowed_mask", False, len(rows), vocab,
                              device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _search(model, rows, config, allowed_mask)
    finally:
        model.train(was_training)


def _search(model: nn.Module, prompts: list[list[int]], config: DecodingConfig,
            mask: Tensor | None) -> BeamOutput:
    """Beam-search every prompt at once: P prompts x N beams are the R = P * N rows of one
    batch (ragged prompts left-padded, with per-row positions), and each prompt's search
    runs exactly as it would alone: once a prompt's search ends, its state is frozen while
    the others go on. Axis legend: P prompts, N beams, K candidates, M max new tokens."""
    n, m, lp = config.num_beams, config.max_new_tokens, config.length_penalty
    device = next(model.parameters()).device
    vocab, p_count = model.config.vocab_size, len(prompts)
    k = min(max(2, 1 + len(config.stop_token_ids)) * n, n * vocab)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    stop_seqs = [torch.tensor(s, device=device) for s in config.stop_sequences]

    width = max(len(p) for p in prompts)
    prompt_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    prompt_pos = torch.tensor([[-1] * (width - len(p)) + list(range(len(p))) for p in prompts],
                              device=device)  # (P, T), -1 on left pads
    ragged = bool((prompt_pos < 0).any())
    cache = model.new_cache(p_count, width + m)
    logits = model(prompt_ids, cache, positions=prompt_pos if ragged else None)[:, -1]  # (P, V)
    # Every beam starts as its prompt: copy each prefilled row instead of prefilling N times.
    row_prompt = torch.arange(p_count, device=device).repeat_interleave(n)  # (R,)
    cache.reorder(row_prompt)
    logits = logits[row_prompt]  # (R, V)
    if mask is not None and mask.dim() == 2:
        mask = mask[row_prompt]  # (R, V)
    history_prompt = torch.where(prompt_pos >= 0, prompt_ids, -1)[row_prompt]  # (R, T)
    next_pos = torch.tensor([len(p) for p in prompts], device=device)[row_prompt]  # (R,)

    tokens = torch.zeros(p_count, n, m, dtype=torch.long, device=device)  # beams' new tokens
    token_logp = torch.zeros(p_count, n, m, device=device)  # (P, N, M)
    # Only beam 0 is real at first; the rest would duplicate its candidates (HF: -1e9).
    beam_sum = torch.full((p_count, n), BLOCK, device=device)  # (P, N)
    beam_sum[:, 0] = 0.0
    # The finished-hypothesis pools: n slots per prompt sorted best first, empty ones scored
    # BLOCK. Every entry is (P, N, ...); `reason` indexes REASONS.
    pool = {"score": torch.full((p_count, n), BLOCK, device=device),
            "sum": torch.zeros(p_count, n, device=device),
            "tokens": tokens.clone(), "logp": token_logp.clone(),
            "len": torch.zeros(p_count, n, dtype=torch.long, device=device),
            "done": torch.zeros(p_count, n, dtype=torch.bool, device=device),
            "reason": torch.zeros(p_count, n, dtype=torch.long, device=device)}
    in_top_n = torch.arange(k, device=device) < n  # (K,) only these may finish
    searching = torch.ones(p_count, dtype=torch.bool, device=device)  # (P,)
    first_row = (torch.arange(p_count, device=device) * n)[:, None]  # (P, 1)

    for step in range(m):
        if step > 0:
            positions = (next_pos + step - 1)[:, None] if ragged else None
            logits = model(tokens.view(-1, m)[:, step - 1:step], cache,
                           positions=positions)[:, -1]  # (R, V)
        # The beams' own histories (prompt + their new tokens) for the penalties, (R, T+step).
        history = torch.cat([history_prompt, tokens.view(-1, m)[:, :step]], dim=1)
        logits = process_logits(logits.float(), config, step, mask, history=history,
                                prompt_len=width)
        if torch.isneginf(logits).all(dim=-1).any():
            raise ValueError(f"no token is allowed at step {step}: allowed_mask, banned ids and "
                             f"min_new_tokens={config.min_new_tokens} remove the whole vocabulary")
        logp = logits.log_softmax(dim=-1).view(p_count, n * vocab)  # (P, N*V)
        cand_sum, flat = (beam_sum.view(-1, 1) + logp.view(-1, vocab)).view(p_count, -1).topk(k)
        parent, token = flat // vocab, flat % vocab  # (P, K), (P, K)
        cand_tokens = tokens.gather(1, parent[..., None].expand(-1, -1, m)).clone()  # (P,K,M)
        cand_logp = token_logp.gather(1, parent[..., None].expand(-1, -1, m)).clone()
        cand_tokens[:, :, step], cand_logp[:, :, step] = token, logp.gather(1, flat)

        # Finish code per candidate: 0 open, 1 stop token, 2 stop sequence (token wins ties).
        ended = torch.zeros(p_count, k, dtype=torch.bool, device=device)  # (P, K)
        for seq in stop_seqs:
            if len(seq) <= step + 1:
                ended |= (cand_tokens[:, :, step + 1 - len(seq):step + 1] == seq).all(dim=-1)
        reason = torch.where(torch.isin(token, stop_ids), 1, 2 * ended.long())  # (P, K)
        hits = (reason > 0) | (step + 1 == m)  # (P, K)

        # Next beams: the n best candidates that did not hit (HF blocks hits by -1e9).
        open_sum = cand_sum + hits.float() * BLOCK
        keep = open_sum.topk(n, dim=1).indices  # (P, N)
        beam_sum = open_sum.gather(1, keep)
        tokens = cand_tokens.gather(1, keep[..., None].expand(-1, -1, m))
        token_logp = cand_logp.gather(1, keep[..., None].expand(-1, -1, m))

        # Pool update, for prompts still searching. HF also blocks additions to a full pool
        # (early_stopping=True) and after its heuristic fired; here both end that prompt's
        # search instead.
        score = cand_sum / ((step + 1) ** lp)  # (P, K) length = new tokens incl. the stop
        finished = hits & in_top_n
        score = score + (~finished).float() * BLOCK
        cand = {"score": score, "sum": cand_sum, "tokens": cand_tokens, "logp": cand_logp,
                "len": torch.full((p_count, k), step + 1, device=device), "done": finished,
                "reason": reason}
        best = torch.cat([pool["score"], score], 1).topk(n, dim=1).indices  # (P, N)
        for key, old in pool.items():
            merged = torch.cat([old, cand[key]], 1)
            index = best.view(p_count, n, *[1] * (merged.dim() - 2)).expand(
                -1, -1, *merged.shape[2:])
            new = merged.gather(1, index)
            frozen = (~searching).view(p_count, *[1] * (new.dim() - 1))
            pool[key] = torch.where(frozen, old, new)

        ends = hits.all(dim=1)  # (P,)
        # HF's stop heuristic: can the best open beam still beat the worst pooled hypothesis?
        horizon = m if config.early_stopping == "never" and lp > 0 else step + 1
        best_possible = beam_sum[:, 0] / (horizon ** lp)  # (P,)
        worst = torch.where(pool["done"], pool["score"].amin(1, keepdim=True), BLOCK)  # (P, N)
        ends |= ~(best_possible[:, None] > worst).any(dim=1)
        if config.early_stopping is True:
            ends |= pool["done"].all(dim=1)
        searching &= ~ends
        if not searching.any():
            break
        cache.reorder((first_row + parent.gather(1, keep)).view(-1))

    out = BeamOutput([], [], [], [], [], [])
    for p, prompt in enumerate(prompts):
        for i in range(config.num_return_sequences):
            length = int(pool["len"][p, i])
            out.sequences.append(pool["tokens"][p, i, :length].tolist())
            out.prompts.append(list(prompt))
            out.logprobs.append(pool["logp"][p, i, :length].tolist())
            out.finish_reasons.append(REASONS[int(pool["reason"][p, i])])
            out.scores.append(float(pool["score"][p, i]))
            out.sum_logprobs.append(float(pool["sum"][p, i]))
    return out
