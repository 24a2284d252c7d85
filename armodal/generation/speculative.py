"""Speculative decoding: cheap proposals, checked by the target model in one forward pass.

Each step, a proposer drafts up to gamma tokens per row: a small draft model sharing the
TokenSpace (sampled from its own processed distribution q), or prompt lookup (the tokens that
followed an earlier occurrence of the row's trailing n-gram; q is then a point mass).
The target scores the row's last committed token plus all drafts in one cached forward, giving
its processed distribution p at every drafted position. Drafts are accepted left to right:

- sampling: draft d is accepted with probability min(1, p(d) / q(d)); the first rejected
  position is resampled from norm(max(0, p - q)); when every draft is accepted, one more
  token is drawn from p. This is the rejection rule of Leviathan et al. / Chen et al. 2023:
  the emitted tokens are distributed exactly as plain sampling from p.
- greedy: drafts are accepted while they equal the target's argmax, and the target's argmax
  is emitted at the first mismatch, so the output is plain greedy decoding's, token for token.

p and q are processed by `process_logits` exactly as plain decoding does at that row's step
and history (penalties, temperature, top-k/top-p/min-p/typical, bans, allowed masks).

Rows accept different numbers of tokens, so both KV caches share one write pointer but keep
per-row positions: rejected slots become holes (position -1, never attended; see
KVCache.discard_from), and the cache is compacted when it fills. A row never feeds the
cache a token twice: tokens committed but not yet seen by a model are its "pending" tokens,
fed at the start of that model's next forward.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from armodal.generation.config import DecodingConfig
from armodal.generation.generate import TokenEvent
from armodal.generation.processors import process_logits
from armodal.generation.sampling import RowSampler
from armodal.generation.speculative_stats import SpeculativeStats
from armodal.generation.stopping import StopChecker

__all__ = ["speculative_decode", "lookup_proposals", "check_draft"]

NEG_INF = float("-inf")


def check_draft(model: nn.Module, draft: nn.Module | None, config: DecodingConfig) -> None:
    """The draft must exist for speculative="draft", share the vocabulary, and be single-stream."""
    if config.speculative == "draft":
        if draft is None:
            raise ValueError("speculative='draft' needs a draft model: pass draft=<Transformer> "
                             "(on the CLI: draft_run=<run dir>), or use "
                             "speculative='prompt_lookup'")
        if draft.config.vocab_size != model.config.vocab_size or draft.config.n_streams != 1:
            raise ValueError(f"the draft model must share the target's token ids: draft "
                             f"vocab_size={draft.config.vocab_size}, n_streams="
                             f"{draft.config.n_streams}; target vocab_size="
                             f"{model.config.vocab_size}, n_streams=1")
    elif draft is not None:
        raise ValueError(f"a draft model was given but speculative={config.speculative!r}; "
                         "set speculative='draft' to use it")


def lookup_proposals(seq: list[int], max_ngram: int, count: int) -> list[int]:
    """Prompt-lookup drafting: the (up to) `count` tokens that followed the earliest earlier
    occurrence of seq's trailing n-gram, trying n = max_ngram down to 1; [] when none occurs.

    Earliest, as Hugging Face's prompt lookup: it has the longest continuation, which in a
    run of repeated text is the difference between one proposal and `count` of them."""
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        tail = seq[-n:]
        for start in range(len(seq) - n):  # every occurrence except the tail itself
            if seq[start:start + n] == tail:
                return seq[start + n:start + n + count]
    return []


class _Rows:
    """Per-row decoding state in Python lists: committed ids and how much each model has seen."""

    def __init__(self, prompts: list[list[int]]):
        self.seqs = [list(p) for p in prompts]  # prompt + committed new tokens
        self.prompt_lens = [len(p) for p in prompts]
        self.done = [False] * len(prompts)

    def generated(self, row: int) -> int:
        return len(self.seqs[row]) - self.prompt_lens[row]

    def active(self) -> list[int]:
        return [r for r, d in enumerate(self.done) if not d]


class _CachedModel:
    """A model plus its cache and, per row, how many committed tokens the cache holds."""

    def __init__(self, model: nn.Module, rows: _Rows, capacity: int, device,
                 compiled: bool = False):
        self.model = model
        self.cache = model.new_cache(len(rows.seqs), capacity)
        self.seen = [0] * len(rows.seqs)
        self.device = device
        # Single-token forwards (the draft's steps) go through the compiled decode step.
        self.step = None
        if compiled:
            from armodal.generation.compiled import compiled_step

            self.step = compiled_step(model)
        # Prefill all but each prompt's last token: that one is fed with the first proposals.
        heads = [p[:-1] for p in rows.seqs]
        if max(len(h) for h in heads) > 0:
            self.forward(heads, [0] * len(heads))
            self.seen = [len(h) for h in heads]

    def forward(self, feeds: list[list[int] | None], starts: list[int]) -> Tensor:
        """Feed row b the ids feeds[b] at positions starts[b], ...; None or [] feeds nothing.
        Rows are left-padded to one width; returns logits (B, W, V) (pad columns are junk)."""
        width = max(len(f) for f in feeds if f)
        if self.cache.pos + width > self.cache.max_len:
            self.cache.compact()
        ids, pos = [], []
        for feed, start in zip(feeds, starts):
            feed = feed or []
            pad = width - len(feed)
            ids.append([0] * pad + feed)
            pos.append([-1] * pad + list(range(start, start + len(feed))))
        idx = torch.tensor(ids, dtype=torch.long, device=self.device)  # (B, W)
        positions = torch.tensor(pos, dtype=torch.long, device=self.device)  # (B, W)
        if self.step is not None and width == 1:
            logits = self.step(idx, self.cache, positions)
            self.cache.padded |= bool((positions < 0).any())
            return logits.float()
        if not self.cache.padded and (positions == self.cache.pos +
                                      torch.arange(width, device=self.device)).all():
            positions = None  # every row sits at the write pointer: the unmasked fast path
        return self.model(idx, self.cache, positions=positions).float()

    def pending(self, rows: _Rows, row: int) -> list[int]:
        return rows.seqs[row][self.seen[row]:]

    def rollback(self, rows: _Rows) -> None:
        """Keep in the cache only committed tokens; the last committed one stays pending."""
        keep = []
        for r, seq in enumerate(rows.seqs):
            self.seen[r] = min(self.seen[r], len(seq) - 1)
            keep.append(self.seen[r])
        self.cache.discard_from(torch.tensor(keep, device=self.device))


def speculative_decode(model: nn.Module, draft: nn.Module | None, prompts: list[list[int]],
                       config: DecodingConfig, allowed: Tensor | None,
                       sampler: RowSampler | None, stops: StopChecker, out, device,
                       stream_text: bool) -> Iterator:
    """The step loop of `generate` with config.speculative set; fills `out` (a
    GenerationOutput), sets out.speculative, and yields a TokenEvent per emitted token."""
    started = time.perf_counter()
    stats = SpeculativeStats()
    rows = _Rows(prompts)
    longest = max(len(p) for p in prompts)
    max_gamma = 2 * config.num_draft_tokens if config.adaptive_draft else config.num_draft_tokens
    limit = model.config.max_seq_len
    if longest + config.max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={config.max_new_tokens} "
                         f"exceeds the model's max_seq_len={limit}; speculative decoding needs "
                         "the whole sequence to fit (no rolling cache)")
    if draft is not None and longest + config.max_new_tokens > draft.config.max_seq_len:
        raise ValueError(f"prompt + max_new_tokens = {longest + config.max_new_tokens} exceeds "
                         f"the draft model's max_seq_len={draft.config.max_seq_len}")
    capacity = longest + config.max_new_tokens + 2 * (max_gamma + 1)
    if config.compile:  # a compiled graph is specialised to its cache length: bucket it
        from armodal.generation.compiled import cache_len

        capacity = cache_len(capacity, limit)
    target = _CachedModel(model, rows, min(limit, capacity), device, config.compile)
    drafter = None if draft is None else _CachedModel(
        draft, rows, min(draft.config.max_seq_len, capacity), device, config.compile)
    gamma = config.num_draft_tokens

    while True:
        active = rows.active()
        if not active:
            break
        # No proposal may reach past a row's token budget or the context.
        room = max(config.max_new_tokens - rows.generated(r) for r in active) - 1
        context = limit - max(len(rows.seqs[r]) for r in active)
        step_gamma = max(0, min(gamma, room, context))
        if drafter is not None and step_gamma > 0:
            proposals, q = _draft(drafter, rows, active, step_gamma, config, allowed, sampler)
        else:
            proposals = {r: lookup_proposals(rows.seqs[r], config.prompt_lookup_max_ngram,
                                             step_gamma) if step_gamma else [] for r in active}
            q = None
        width = max(len(proposals[r]) for r in active)
        feeds = [None] * len(rows.seqs)
        for r in active:
            feeds[r] = target.pending(rows, r) + proposals[r]
        logits = target.forward(feeds, [target.seen[r] for r in range(len(rows.seqs))])
        stats.target_forwards += 1
        stats.row_steps += len(active)
        # Target logits at the last pending token and each proposal: (B, width + 1, V).
        scored = torch.stack([_row_tail(logits, r, proposals.get(r), width + 1)
                              for r in range(len(feeds))])
        for r in active:
            target.seen[r] += len(feeds[r])  # provisional; rollback trims rejected drafts
        emitted = _verify(scored, proposals, q, rows, active, config, allowed, sampler)
        all_in = True
        for r in active:
            tokens, logps, tops, n_accepted = emitted[r]
            stats.drafted += len(proposals[r])
            stats.accepted += n_accepted
            all_in &= n_accepted == len(proposals[r])
            for token, logp, top in zip(tokens, logps, tops):
                rows.seqs[r].append(token)
                stats.new_tokens += 1
                out.sequences[r].append(token)
                out.logprobs[r].append(logp)
                if out.top_logprobs is not None:
                    out.top_logprobs[r].append(top)
                reason = stops.update(r, token)
                if reason is None and rows.generated(r) == config.max_new_tokens:
                    reason = "length"
                    stops.finish(r, reason)
                if reason is not None:
                    rows.done[r] = True
                    out.finish_reasons[r] = reason
                text = stops.stream_text(r, final=reason is not None) if stream_text else ""
                yield TokenEvent(r, token, logp, text, reason)
                if reason is not None:
                    break
        target.rollback(rows)
        if drafter is not None:
            drafter.rollback(rows)
        if config.adaptive_draft and width == gamma:
            # Hugging Face's schedule: +2 after a step where every proposal was accepted,
            # -1 otherwise. In a batch "every" means every row, so big batches draft less:
            # there the verify pass is no longer free (it multiplies the rows computed).
            gamma = min(gamma + 2, max_gamma) if all_in else max(gamma - 1, 1)
    stats.seconds = time.perf_counter() - started
    out.speculative = stats


def _row_tail(logits: Tensor, row: int, proposal: list[int] | None, n: int) -> Tensor:
    """Row's target logits (n, V) after its last pending token and after each proposal (the
    row's last len(proposal) + 1 columns; rows are left-padded), zero-padded to n rows;
    all zeros for an inactive row (proposal None)."""
    if proposal is None:
        return logits.new_zeros(n, logits.shape[-1])
    tail = logits[row, logits.shape[1] - len(proposal) - 1:]  # (len(proposal) + 1, V)
    return torch.cat([tail, tail.new_zeros(n - tail.shape[0], tail.shape[-1])])


def _process(logits: Tensor, config: DecodingConfig, allowed: Tensor | None,
             rows: list[int], histories: list[list[int]], steps: list[int],
             prompt_lens: list[int]) -> Tensor:
    """process_logits for logits (N, V) of N (row, position) pairs, each with its own history
    and step. One batched call when nothing depends on them; else one call per pair."""
    row_allowed = allowed if allowed is None or allowed.dim() == 1 else allowed[rows]
    if config.min_new_tokens == 0 and not config.uses_history:
        return process_logits(logits, config, 0, row_allowed)
    out = []
    for i, (history, step) in enumerate(zip(histories, steps)):
        mask = row_allowed if row_allowed is None or row_allowed.dim() == 1 else row_allowed[i]
        out.append(process_logits(logits[i:i + 1], config, step, mask,
                                  history=torch.tensor([history], device=logits.device),
                                  prompt_len=prompt_lens[i]))
    return torch.cat(out)


def _draft(drafter: _CachedModel, rows: _Rows, active: list[int], gamma: int,
           config: DecodingConfig, allowed: Tensor | None, sampler: RowSampler | None):
    """Run the draft model up to gamma steps for the active rows: proposals {row: ids} and
    the draft's processed distributions q (B, gamma, V) they were drawn from (None if greedy).

    A row stops drafting after a proposal the draft itself gave less than
    config.draft_confidence: it would likely be rejected, and each proposal costs a draft
    step and a verified position. Where drafting stops depends on the draft alone, so the
    output distribution stays exact."""
    n_rows = len(rows.seqs)
    feeds = [drafter.pending(rows, r) if r in active else None for r in range(n_rows)]
    drafting = list(active)
    proposals = {r: [] for r in active}
    qs = []
    for j in range(gamma):
        logits = drafter.forward(feeds, list(drafter.seen))[:, -1]  # (B, V)
        for r in drafting:
            drafter.seen[r] += len(feeds[r])  # provisional; rollback trims rejected drafts
        lp = _process(logits[drafting], config, allowed, drafting,
                      [rows.seqs[r] + proposals[r] for r in drafting],
                      [rows.generated(r) + j for r in drafting],
                      [rows.prompt_lens[r] for r in drafting])  # (A, V)
        probs = lp.softmax(-1)  # (A, V)
        if sampler is None:
            chosen = probs.argmax(-1)
        else:
            full = probs.new_zeros(n_rows, probs.shape[-1])
            full[drafting] = probs
            qs.append(full)
            chosen = sampler.sample(_safe_rows(full))[drafting]
        confidence = probs.gather(-1, chosen[:, None]).squeeze(-1)  # (A,)
        confident = (confidence >= config.draft_confidence).tolist()
        for r, token in zip(drafting, chosen.tolist()):
            proposals[r].append(token)
        drafting = [r for r, keep in zip(drafting, confident) if keep]
        if not drafting:
            break
        feeds = [[proposals[r][-1]] if r in drafting else None for r in range(n_rows)]
    q = torch.stack(qs, 1) if qs else None  # (B, steps, V)
    return proposals, q


def _safe_rows(probs: Tensor) -> Tensor:
    """Give all-zero rows (inactive) a valid distribution so sampling them is harmless."""
    empty = probs.sum(-1) == 0
    return probs.index_fill(0, empty.nonzero().flatten(), 1.0) if empty.any() else probs


def _verify(scored: Tensor, proposals: dict, q: Tensor | None, rows: _Rows, active: list[int],
            config: DecodingConfig, allowed: Tensor | None, sampler: RowSampler | None) -> dict:
    """Accept proposals and draw the correcting / bonus token; {row: (tokens, logprobs,
    top_logprobs, n_accepted)}."""
    n_rows, width = scored.shape[0], scored.shape[1]
    pairs = [(r, j) for r in active for j in range(len(proposals[r]) + 1)]
    pair_rows, pair_cols = [r for r, _ in pairs], [j for _, j in pairs]
    logits = _process(scored[pair_rows, pair_cols], config, allowed, pair_rows,
                      [rows.seqs[r] + proposals[r][:j] for r, j in pairs],
                      [rows.generated(r) + j for r, j in pairs],
                      [rows.prompt_lens[r] for r in pair_rows])  # (N, V)
    if torch.isneginf(logits).all(-1).any():
        raise ValueError("no token is allowed at some step: the allowed masks, bans and the "
                         "stop ids blocked by min_new_tokens remove the whole vocabulary")
    processed = logits.new_full((n_rows, width, logits.shape[-1]), NEG_INF)
    processed[pair_rows, pair_cols] = logits
    logp = processed.log_softmax(-1)  # (B, width, V); -inf / NaN on unused positions
    n_accepted = {}
    if sampler is None:
        best = processed.argmax(-1)  # (B, width)
        for r in active:
            a = 0
            while a < len(proposals[r]) and proposals[r][a] == int(best[r, a]):
                a += 1
            n_accepted[r] = a
        final = best
    else:
        p = logp.exp().nan_to_num(0.0)  # (B, width, V)
        for r in active:
            n_accepted[r] = _accept_count(p[r], None if q is None else q[r], proposals[r],
                                          sampler.generators[r])
        # The emitted token at each row's stop point: from the residual after a rejection,
        # else (all accepted, or no proposals) from p itself.
        at = torch.tensor([n_accepted.get(r, 0) for r in range(n_rows)], device=p.device)
        p_at = p[torch.arange(n_rows), at]  # (B, V)
        dist = p_at.clone()
        for r in active:
            a = n_accepted[r]
            if a < len(proposals[r]):
                q_at = _q_at(q, r, a, proposals[r][a], p.shape[-1], p.device)
                residual = (p_at[r] - q_at).clamp(min=0)
                if residual.sum() > 0:
                    dist[r] = residual
        final = torch.zeros(n_rows, width, dtype=torch.long, device=p.device)
        final[torch.arange(n_rows), at] = sampler.sample(_safe_rows(dist))
    emitted = {}
    for r in active:
        a = n_accepted[r]
        tokens = proposals[r][:a] + [int(final[r, a])]
        logps = [float(logp[r, j, t]) for j, t in enumerate(tokens)]
        tops = [[]] * len(tokens)
        if config.top_logprobs:
            top = logp[r, :a + 1].topk(config.top_logprobs, dim=-1)
            tops = [list(zip(top.indices[j].tolist(), top.values[j].tolist()))
                    for j in range(a + 1)]
        emitted[r] = (tokens, logps, tops, a)
    return emitted


def _q_at(q: Tensor | None, row: int, j: int, token: int, vocab: int, device) -> Tensor:
    """The proposer's distribution (V,) at position j: the draft model's, or for prompt
    lookup a point mass on the proposed token."""
    if q is not None:
        return q[row, j]
    point = torch.zeros(vocab, device=device)
    point[token] = 1.0
    return point


def _accept_count(p: Tensor, q: Tensor | None, proposal: list[int],
                  generator: torch.Generator) -> int:
    """Leading proposals accepted, each with probability min(1, p(d) / q(d)).
    p (width, V) target probabilities; q (gamma, V) draft probabilities or None (point mass)."""
    if not proposal:
        return 0
    ids = torch.tensor(proposal, device=p.device)
    positions = torch.arange(len(proposal), device=p.device)
    p_d = p[positions, ids]  # (n,)
    q_d = q[positions, ids] if q is not None else torch.ones_like(p_d)
    u = torch.rand(len(proposal), generator=generator, device=p.device)
    accepted = (u * q_d < p_d).long()  # u < p/q without dividing by a tiny q
    return int(accepted.cumprod(0).sum())
