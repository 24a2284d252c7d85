"""BatchCache: the KV cache of a decode batch whose rows come and go.

The model's KVCache advances every row together: one slot index `pos` is written per step,
and each row says which token position each of its slots holds (`slot_pos`, -1 = empty, never
attended). Rows need not line up, so a batch of independent requests shares one cache:

- a new row is prefilled (alone, or left-padded with the others that arrived at the same
  step) and its P prompt slots are copied to slots [0, P) of a fresh batch row (positions
  0..P-1); if `pos` < P every row's `pos` moves on to P, leaving the old
  rows a run of empty slots, which cost a little attention compute and nothing else;
- each step writes the new token of every row at slot `pos`, at that row's own position;
- a finished row leaves by moving the last rows into its place (only their filled slots);
- when `pos` reaches the end, every row's used slots are moved to the front (KVCache.compact).

Storage for `capacity` rows is allocated once; the KVCache the model sees holds views of the
first B rows, so joins and leaves never reallocate the whole cache.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from armodal.kv_cache import KVCache

__all__ = ["BatchCache"]


class BatchCache:
    """Rows 0..size-1 of preallocated storage for `capacity` rows of max_seq_len slots."""

    def __init__(self, model: nn.Module, capacity: int):
        self.store = model.new_cache(capacity)  # (L, capacity, G, S, D) storage
        self.cache = model.new_cache(0)  # what the model sees: views of the first `size` rows
        self.cache.padded = True  # rows hold empty slots: attention always takes the mask
        self.capacity = capacity
        self.size = 0
        self._point()

    @property
    def max_len(self) -> int:
        return self.store.max_len

    def _point(self) -> None:
        """Aim the model's cache at the first `size` rows of storage (views, no copies)."""
        b = self.size
        self.cache.k, self.cache.v = self.store.k[:, :b], self.store.v[:, :b]  # (L, B, G, S, D)
        self.cache.slot_pos = self.store.slot_pos[:b]  # (B, S)

    def add(self, prefill: KVCache, row: int, length: int, copies: int) -> None:
        """Append `copies` rows holding the prompt that row `row` of `prefill` holds: a
        left-padded prefill, so its `length` tokens sit in the last slots before prefill.pos."""
        if self.size + copies > self.capacity:
            raise ValueError(f"batch cache holds {self.capacity} rows; {self.size} are used and "
                             f"{copies} more were asked for")
        if length >= self.max_len:
            raise ValueError(f"a prompt of {length} tokens leaves no slot to decode in a cache "
                             f"of {self.max_len}")
        if self.size == 0:
            self.cache.pos = 0
        rows, src = slice(self.size, self.size + copies), slice(prefill.pos - length, prefill.pos)
        # (L, copies, G, P, D): the one prefilled row, broadcast to every copy
        self.store.k[:, rows, :, :length] = prefill.k[:, row:row + 1, :, src]
        self.store.v[:, rows, :, :length] = prefill.v[:, row:row + 1, :, src]
        self.store.slot_pos[rows] = -1
        self.store.slot_pos[rows, :length] = torch.arange(length, device=self.store.slot_pos.device)
        self.size += copies
        self._point()
        # Every row writes its next token at slot pos, so the new rows need pos >= length.
        self.cache.pos = max(self.cache.pos, length)

    def remove(self, leaving: list[int]) -> list[int]:
        """Drop rows `leaving`; returns, per new row index, the old index it came from.

        The last surviving rows move into the holes (only their filled slots are copied), so
        the cost is that of the rows that move, not of the whole batch.
        """
        gone = set(leaving)
        new_size = self.size - len(gone)
        holes = sorted(i for i in gone if i < new_size)
        movers = [i for i in range(new_size, self.size) if i not in gone]
        order = [i for i in range(new_size)]
        if holes:
            device = self.store.slot_pos.device
            src, dst = torch.tensor(movers, device=device), torch.tensor(holes, device=device)
            filled = slice(0, self.cache.pos)
            self.store.k[:, dst, :, filled] = self.store.k[:, src, :, filled]
            self.store.v[:, dst, :, filled] = self.store.v[:, src, :, filled]
            self.store.slot_pos[dst] = self.store.slot_pos[src]
            for hole, mover in zip(holes, movers):
                order[hole] = mover
        self.size = new_size
        self._point()
        if self.size == 0:
            self.cache.pos = 0
        return order

    def make_room(self) -> None:
        """Before a step: if slot `pos` is past the end, move every row's used slots to the
        front, so pos becomes the longest row's length (< max_len for a row that still runs)."""
        if self.cache.pos < self.max_len:
            return
        self.cache.compact()  # replaces the views by compacted (L, B, G, S, D) tensors
        b = self.size
        self.store.k[:, :b], self.store.v[:, :b] = self.cache.k, self.cache.v
        self.store.slot_pos[:b] = self.cache.slot_pos
        self._point()
        self.cache.padded = True

    def step(self, model: nn.Module, tokens: Tensor, positions: Tensor) -> Tensor:
        """One decode step: tokens (B,) at positions (B,) -> next-token logits (B, V)."""
        self.make_room()
        logits = model(tokens[:, None], self.cache, positions=positions[:, None])  # (B, 1, V)
        return logits[:, -1]
