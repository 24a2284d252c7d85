"""The peer for bench/text_shakespeare.py: nanoGPT's model and training loop, as nanoGPT runs on CPU.

Written for this benchmark from nanoGPT's published design (GPT-2 blocks: learned position
embeddings, LayerNorm, GELU MLP, tied embeddings, no biases) and its documented CPU settings for
shakespeare_char: 4 layers, 4 heads, 128 wide, 64-token context, batch 12, 2000 iterations, lr
1e-3 -> 1e-4 cosine with 100 warmup steps, AdamW(0.9, 0.99), weight decay 0.1, clip 1.0.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(width, bias=False)
        self.c_attn = nn.Linear(width, 3 * width, bias=False)
        self.c_proj = nn.Linear(width, width, bias=False)
        self.ln_2 = nn.LayerNorm(width, bias=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width, bias=False), nn.GELU(),
                                 nn.Linear(4 * width, width, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        x = x + self.c_proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size: int, block_size: int, n_layer: int = 4, n_head: int = 4,
                 width: int = 128):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, width)
        self.wpe = nn.Embedding(block_size, width)
        self.blocks = nn.ModuleList(Block(width, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(width, bias=False)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def train_reference(train: np.ndarray, vocab_size: int,
                    evaluate: Callable[[nn.Module], float], iters: int = 2000,
                    eval_every: int = 250, block_size: int = 64, batch_size: int = 12,
                    seed: int = 1337) -> list[tuple[int, float, float]]:
    """nanoGPT's loop; returns (iteration, training seconds, val loss) at each evaluation."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GPT(vocab_size, block_size)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-3, betas=(0.9, 0.99))
    data = torch.from_numpy(train.astype(np.int64))

    def lr_at(it: int) -> float:
        if it < 100:
            return 1e-3 * (it + 1) / 101
        ratio = (it - 100) / (iters - 100)
        return 1e-4 + 0.5 * (1 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    history, seconds = [], 0.0
    for it in range(1, iters + 1):
        start = time.perf_counter()
        ix = torch.from_numpy(rng.integers(0, len(data) - block_size - 1, batch_size))
        batch = torch.stack([data[i:i + block_size + 1] for i in ix])  # (B, T+1)
        for group in opt.param_groups:
            group["lr"] = lr_at(it - 1)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seconds += time.perf_counter() - start
        if it % eval_every == 0 or it == iters:
            model.eval()
            history.append((it, seconds, evaluate(model)))
            model.train()
    return history
