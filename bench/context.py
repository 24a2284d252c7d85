"""What every case needs: the prepared models, their transformers twins, the run's settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from models import Prepared


@dataclass(frozen=True)
class Settings:
    """Per-size workload, chosen so the full suite fits ~25 minutes on 2 cores for both sizes.

    new_tokens: decoded after a prompt_len-token held-out prompt (no stop token, so every row
    runs to full length on both sides). beam_batches: beam search (4 beams) is 4x the rows,
    so batch 32 is left out at full sizes. train_batch x train_seq: the training-step case.
    eval_batches: held-out windows of eval_seq tokens, 8 per batch, for perplexity.
    compile_batches: greedy batch sizes of the compiled-vs-eager case; none in --quick, where
    compiling (~20 s a shape on 2 cores) would cost more than the rest of the run.
    """

    prompt_len: int
    new_tokens: int
    batches: tuple[int, ...]
    beam_batches: tuple[int, ...]
    runs: int
    train_batch: int
    train_seq: int
    eval_batches: int
    eval_seq: int
    compile_batches: tuple[int, ...] = (1, 8)
    matmul_n: int = 2048


SETTINGS = {
    "quick": Settings(16, 16, (1, 8), (1,), 1, 4, 64, 1, 64, compile_batches=(),
                      matmul_n=1024),
    "20m": Settings(32, 128, (1, 8, 32), (1, 8), 3, 8, 256, 8, 256),
    "120m": Settings(32, 64, (1, 8, 32), (1, 8), 3, 4, 256, 4, 256),
}


@dataclass
class Bench:
    """One size's models on both sides and the settings its cases run with."""

    prep: Prepared
    hf: torch.nn.Module  # transformers LlamaForCausalLM, same weights as prep.target
    hf_draft: torch.nn.Module  # same weights as prep.draft
    settings: Settings
    peak_fp32: float  # GFLOP/s
    peak_bf16: float

    def name(self, case: str) -> str:
        """The figure name: size-prefixed, so both sizes' lines can be grepped apart."""
        return f"{self.prep.size.name}_{case}"

    def prompts(self, batch: int) -> torch.Tensor:
        """(batch, prompt_len) held-out windows; the same for every case of that batch size."""
        return self.prep.corpus.prompts(batch, self.settings.prompt_len, seed=batch)
