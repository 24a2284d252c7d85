"""Beam search with Hugging Face transformers' exact semantics (checked against 5.x).

Each prompt is searched on its own: its `num_beams` beams are the rows of one batch that
share one KV cache (the prompt is prefilled once with batch 1, then the cache is copied to
num_beams rows, and reordered to the surviving beams' parents after every step).

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
    out = BeamOutput([], [], [], [], [], [])
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for r, prompt in enumerate(rows):
                mask = allowed_mask if allowed_mask is None or allowed_mask.dim() == 1 \
                    else allowed_mask[r]
                _search_one(model, prompt, config, mask, out)
    finally:
        model.train(was_training)
    return out


def _search_one(model: nn.Module, prompt: list[int], config: DecodingConfig,
                mask: Tensor | None, out: BeamOutput) -> None:
    """Beam-search one prompt and append its n best hypotheses to `out`."""
    n, m, lp = config.num_beams, config.max_new_tokens, config.length_penalty
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    k = min(max(2, 1 + len(config.stop_token_ids)) * n, n * vocab)
    stop_ids = torch.tensor(config.stop_token_ids, dtype=torch.long, device=device)
    stop_seqs = [torch.tensor(s, device=device) for s in config.stop_sequences]

    prompt_ids = torch.tensor([prompt], device=device)  # (1, P)
    cache = model.new_cache(1, len(prompt) + m)
    logits = model(prompt_ids, cache)[:, -1]  # (1, V)
    # Every beam starts as the prompt: copy the one prefilled row instead of prefilling n.
    cache.reorder(torch.zeros(n, dtype=torch.long, device=device))
    logits = logits.expand(n, -1)  # (N, V)

    tokens = torch.zeros(n, m, dtype=torch.long, device=device)  # (N, M) beams' new tokens
    token_logp = torch.zeros(n, m, device=device)  # (N, M)
    # Only beam 0 is real at first; the rest would duplicate its candidates (HF: -1e9).
    beam_sum = torch.full((n,), BLOCK, device=device)  # (N,)
    beam_sum[0] = 0.0
    # The finished-hypothesis pool: n slots sorted best first, empty ones scored BLOCK.
    # Every entry is (N, ...); `reason` indexes REASONS.
    pool = {"score": torch.full((n,), BLOCK, device=device), "sum": torch.zeros(n, device=device),
            "tokens": tokens.clone(), "logp": token_logp.clone(),
            "len": torch.zeros(n, dtype=torch.long, device=device),
            "done": torch.zeros(n, dtype=torch.bool, device=device),
            "reason": torch.zeros(n, dtype=torch.long, device=device)}
    in_top_n = torch.arange(k, device=device) < n  # (K,) only these may finish

    for step in range(m):
        if step > 0:
            logits = model(tokens[:, step - 1:step], cache)[:, -1]  # (N, V)
        # The beams' own histories (prompt + their new tokens) for the penalties, (N, P+step).
        history = torch.cat([prompt_ids.expand(n, -1), tokens[:, :step]], dim=1)
        logits = process_logits(logits.float(), config, step, mask, history=history,
                                prompt_len=len(prompt))
        if torch.isneginf(logits).all(dim=-1).any():
            raise ValueError(f"no token is allowed at step {step}: allowed_mask, banned ids and "
                             f"min_new_tokens={config.min_new_tokens} remove the whole vocabulary")
        logp = logits.log_softmax(dim=-1)  # (N, V)
        cand_sum, flat = (beam_sum[:, None] + logp).view(-1).topk(k)  # (K,), (K,) best first
        parent, token = flat // vocab, flat % vocab  # (K,), (K,)
        cand_tokens, cand_logp = tokens[parent], token_logp[parent]  # (K, M)
        cand_tokens[:, step], cand_logp[:, step] = token, logp[parent, token]

        # Finish code per candidate: 0 open, 1 stop token, 2 stop sequence (token wins ties).
        ended = torch.zeros(k, dtype=torch.bool, device=device)  # (K,)
        for seq in stop_seqs:
            if len(seq) <= step + 1:
                ended |= (cand_tokens[:, step + 1 - len(seq):step + 1] == seq).all(dim=-1)
        reason = torch.where(torch.isin(token, stop_ids), 1, 2 * ended.long())  # (K,)
        hits = (reason > 0) | (step + 1 == m)  # (K,)

        # Next beams: the n best candidates that did not hit (HF blocks hits by -1e9).
        open_sum = cand_sum + hits.float() * BLOCK
        keep = open_sum.topk(n).indices  # (N,)
        beam_sum, tokens, token_logp = open_sum[keep], cand_tokens[keep], cand_logp[keep]

        # Pool update. HF also blocks additions to a full pool (early_stopping=True) and after
        # its heuristic fired; searching one prompt at a time, both end the loop instead.
        score = cand_sum / ((step + 1) ** lp)  # (K,) length = new tokens incl. the stop token
        finished = hits & in_top_n
        score += (~finished).float() * BLOCK
        cand = {"score": score, "sum": cand_sum, "tokens": cand_tokens, "logp": cand_logp,
                "len": torch.full((k,), step + 1, device=device), "done": finished,
                "reason": reason}
        best = torch.cat([pool["score"], score]).topk(n).indices  # (N,) into [pool; cand]
        pool = {key: torch.cat([pool[key], cand[key]])[best] for key in pool}

        if hits.all():
            break
        cache.reorder(parent[keep])
        # HF's stop heuristic: can the best open beam still beat the worst pooled hypothesis?
        horizon = m if config.early_stopping == "never" and lp > 0 else step + 1
        best_possible = beam_sum[0] / (horizon ** lp)
        worst = torch.where(pool["done"], pool["score"].min(), BLOCK)  # (N,)
        if not (best_possible > worst).any():
            break
        if config.early_stopping is True and pool["done"].all():
            break

    for i in range(config.num_return_sequences):
        length = int(pool["len"][i])
        out.sequences.append(pool["tokens"][i, :length].tolist())
        out.prompts.append(list(prompt))
        out.logprobs.append(pool["logp"][i, :length].tolist())
        out.finish_reasons.append(REASONS[int(pool["reason"][i])])
        out.scores.append(float(pool["score"][i]))
        out.sum_logprobs.append(float(pool["sum"][i]))
