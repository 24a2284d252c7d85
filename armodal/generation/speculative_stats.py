"""What one speculative decoding call reports."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SpeculativeStats"]


@dataclass
class SpeculativeStats:
    """Acceptance figures of one speculative `generate` call, summed over its rows.

    Attributes:
        drafted: draft tokens proposed (rows still decoding only).
        accepted: of those, accepted by the target.
        new_tokens: tokens emitted (accepted drafts plus one target token per step and row).
        target_forwards: forward passes of the target model after the prefill.
        row_steps: rows still decoding, summed over those forward passes.
        seconds: wall time of the call, prefill included.
    """

    drafted: int = 0
    accepted: int = 0
    new_tokens: int = 0
    target_forwards: int = 0
    row_steps: int = 0
    seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean new tokens per row per target forward: plain decoding makes 1, so this is the
        speed-up over plain decoding if drafting cost nothing."""
        return self.new_tokens / self.row_steps if self.row_steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0
