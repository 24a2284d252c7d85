"""The KV cache decoding runs on: static (slot s holds step s), rolling (a ring for
sliding-window models) or with attention sinks (the first positions kept beside a ring of the
recent ones, so any model decodes past max_seq_len in bounded memory).

Axis legend as in armodal/model.py: B batch, T new positions, S cache slots, G key/value heads,
D head width.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from armodal.rope import apply_rope

if TYPE_CHECKING:
    from armodal.model import ModelConfig

__all__ = ["KVCache", "max_sink_slots"]

class KVCache:
    """Preallocated keys and values for every layer, and the position each slot holds.

    All rows advance together: `pos` counts the steps written. Rows of a ragged batch are
    left-padded, and pad slots hold position -1, so no query ever attends to them.
    A static cache holds slots [0, max_len) in order. A rolling cache (sliding-window models)
    is a ring of `max_len` >= window slots, so decoding can run past max_seq_len with
    bounded memory: RoPE is relative, and the window keeps every distance below it.

    A sink cache (`sinks` set; StreamingLLM, Xiao et al. 2023) lets any model, full-attention
    included, decode indefinitely: slots [0, sinks) keep the first `sinks` positions forever,
    the other `window` = max_len - sinks slots are a ring of the most recent positions, and a
    query attends to both. Its keys are stored before RoPE; see `place` for why.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                 rolling: bool = False, sinks: int | None = None):
        if sinks is not None:
            _check_sinks(config, max_len, sinks, rolling)
        elif rolling and (config.sliding_window is None or max_len < config.sliding_window):
            raise ValueError(f"a rolling cache needs a sliding-window model and max_len >= "
                             f"the window; got sliding_window={config.sliding_window}, "
                             f"max_len={max_len}")
        if not rolling and max_len > config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's "
                             f"max_seq_len={config.max_seq_len}")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, G, S, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, G, S, D)
        self.slot_pos = torch.full((batch_size, max_len), -1, dtype=torch.long, device=device)
        self.max_len = max_len
        self.rolling = rolling
        self.sinks = sinks
        self.padded = False  # some slot holds a pad: masks are needed even for T = 1
        self.pos = 0
        # Sink caches, during one forward: the slots its tokens go to (rows, columns, slots)
        # and the RoPE tables (B, 1, S, D) that rotate every slot's key to its cache position.
        self._writes: tuple[Tensor, Tensor, Tensor] | None = None
        self.key_rope: tuple[Tensor, Tensor] | None = None

    @property
    def static(self) -> bool:
        """Slot s holds the s-th step, in order (neither a ring nor sinks): what in-place beam
        reordering, speculative rollback and the compiled step rely on."""
        return not self.rolling and self.sinks is None

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the surviving beams' parents."""
        if rows.shape[0] == self.k.shape[1] and self.static:
            # Same batch size (a beam step): move only the filled slots, in place. Slots past
            # pos hold no position in any row (slot_pos -1), so they are never attended.
            filled = slice(0, self.pos)
            self.k[:, :, :, filled] = self.k[:, rows, :, filled]
            self.v[:, :, :, filled] = self.v[:, rows, :, filled]
        else:
            self.k = self.k.index_select(1, rows)
            self.v = self.v.index_select(1, rows)
        self.slot_pos = self.slot_pos.index_select(0, rows)

    def discard_from(self, positions: Tensor) -> None:
        """Forget every slot of row b holding position >= positions[b] (B,): speculative
        decoding's rollback of rejected drafts. Rows may keep different numbers of slots; the
        forgotten ones become holes (position -1, never attended), and `pos` moves back to
        just after the last slot any row still uses. Static caches only."""
        if not self.static:
            raise ValueError("discard_from needs a static cache, not a rolling or sink one")
        self.slot_pos.masked_fill_(self.slot_pos >= positions[:, None], -1)
        used = self.slot_pos >= 0  # (B, S)
        slot_ends = torch.arange(1, self.max_len + 1, device=used.device)  # (S,)
        self.pos = int((used * slot_ends).amax())
        self.padded = bool((~used[:, :self.pos]).any())

    def compact(self) -> None:
        """Move each row's used slots to the front, in order, so holes left by rejected drafts
        (and left padding) stop taking room: slot s of row b becomes its n-th used slot."""
        if not self.static:
            raise ValueError("compact needs a static cache, not a rolling or sink one")
        used = self.slot_pos >= 0  # (B, S)
        slots = torch.arange(self.max_len, device=used.device)
        order = torch.where(used, slots, slots + self.max_len).argsort(dim=1)  # used first
        index = order[None, :, None, :, None].expand_as(self.k)  # (L, B, G, S, D)
        self.k = self.k.gather(3, index)
        self.v = self.v.gather(3, index)
        self.slot_pos = self.slot_pos.gather(1, order)
        counts = used.sum(1)  # (B,)
        self.pos = int(counts.max())
        self.padded = bool((counts < self.pos).any())

    def slots(self, t: int) -> Tensor:
        """Slot indices (T,) that the next t steps are written to (only the last max_len
        of them survive in a ring)."""
        idx = torch.arange(self.pos, self.pos + t, device=self.slot_pos.device)
        return idx % self.max_len if self.rolling else idx

    def pieces(self, t: int, positions: Tensor | None) -> list[tuple[int, int]]:
        """Sink caches: the column ranges a forward of t tokens (positions (B, T) or None:
        from pos on) runs in. Queries whose positions all fit in the cache run together; past
        that each query numbers the cache from its own shift (`place`), so one at a time."""
        if positions is None:
            last = torch.arange(self.pos, self.pos + t)  # (T,)
        else:
            last = positions.amax(0)  # (T,): the furthest row's position in each column
        fits = max(int((last < self.max_len).long().cumprod(0).sum()), 1)
        return [(0, fits)] + [(i, i + 1) for i in range(fits, t)]

    def place(self, q_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Sink caches, before a forward of queries at token positions q_pos (1|B, T), -1 on
        pads: give each token its slot (position p < sinks: slot p; later: the ring slot
        sinks + (p - sinks) % window, evicting a position the window no longer sees), record
        it in slot_pos, and return the RoPE positions of the queries (B, T) and slots (B, S).

        RoPE positions are numbered inside the cache, as StreamingLLM does, not by position in
        the text: a model without a sliding window never saw a distance >= max_seq_len, so
        past it the sinks would sit at distances it cannot read (and float32 angles of huge
        positions lose precision). Inside the cache the sinks keep 0..sinks-1 and the ring's
        positions are shifted down so the query sits at <= max_len - 1: distances to recent
        keys are the true ones, the sinks look like the text just before the window. The
        shift changes every step, so keys are cached before RoPE and rotated per forward.
        While the sequence fits (<= max_len positions) the shift is 0: exactly the static
        cache. A forward's queries share one shift, so `pieces` splits the ones past it.
        """
        q = q_pos.expand(self.slot_pos.shape[0], -1)  # (B, T)
        rows, cols = (q >= 0).nonzero(as_tuple=True)  # pads take no slot
        written = q[rows, cols]
        window = self.max_len - self.sinks
        slots = torch.where(written < self.sinks, written,
                            self.sinks + (written - self.sinks) % window)
        self.slot_pos[rows, slots] = written
        self._writes = (rows, cols, slots)
        shift = (q.amax(1, keepdim=True) - (self.max_len - 1)).clamp(min=0)  # (B, 1)
        keys = torch.where(self.slot_pos < self.sinks, self.slot_pos, self.slot_pos - shift)
        # Empty slots (-1) and ring slots outside the window are masked; clamp keeps them legal.
        return (q - shift).clamp(min=0), keys.clamp(min=0)

    def write_unrotated(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Sink caches: store layer `layer`'s new keys (before RoPE) and values (B, G, T, D) in
        the slots `place` gave them; return every slot's key rotated to its cache position,
        and the values, (B, G, S, D). Writing before attending is safe: a slot is only reused
        for a position the window no longer sees."""
        rows, cols, slots = self._writes
        # .to: under autocast k and v are bf16 while the cache keeps the weights' dtype.
        self.k[layer][rows, :, slots] = k[rows, :, cols].to(self.k.dtype)  # (N, G, D)
        self.v[layer][rows, :, slots] = v[rows, :, cols].to(self.v.dtype)
        cos, sin = self.key_rope
        return apply_rope(self.k[layer], cos, sin), self.v[layer]


def max_sink_slots(config: ModelConfig, sinks: int) -> int:
    """The most slots a sink cache with `sinks` sinks may have: its cache positions go up to
    slots - 1, so they must be positions the model was trained at; and a sliding-window model
    never looks further back than its window."""
    if config.sliding_window is None:
        return config.max_seq_len
    return min(config.max_seq_len, sinks + config.sliding_window)


def _check_sinks(config: ModelConfig, max_len: int, sinks: int, rolling: bool) -> None:
    """A sink cache of `max_len` slots: `sinks` of them, the rest the recent window."""
    if rolling:
        raise ValueError("a cache is rolling (sliding-window ring) or has attention sinks, "
                         "not both")
    if not (isinstance(sinks, int) and not isinstance(sinks, bool) and sinks >= 0):
        raise ValueError(f"attention sinks={sinks!r}; expected an int >= 0")
    window = max_len - sinks
    if window < 1:
        raise ValueError(f"sink cache of max_len={max_len} slots leaves window={window} after "
                         f"sinks={sinks}; the window needs >= 1 slot")
    limit = max_sink_slots(config, sinks)
    if max_len > limit:
        raise ValueError(f"sinks={sinks} + window={window} = {max_len} cache slots; this model "
                         f"allows at most {limit} (max_seq_len={config.max_seq_len}, "
                         f"sliding_window={config.sliding_window})")
