"""The one causal transformer armodal trains on every modality.

Decoder-only, pre-norm, RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query
attention, optional sliding-window attention and a preallocated KV cache for decoding.

Axis legend for the shape comments and einops patterns:
    B batch, T time (query positions), S cache / key positions, K parallel token streams,
    V vocabulary, C model width (d_model), H query heads, G key/value heads, D head width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """Shape of the transformer. `vocab_size` comes from the TokenSpace at build time."""

    vocab_size: int
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: same as n_head (plain multi-head attention)
    d_model: int = 128
    d_ff: int | None = None  # None: about 8/3 * d_model, the SwiGLU size with MLP-equal params
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    dropout: float = 0.0
    tie_embeddings: bool = False
    sliding_window: int | None = None  # keys older than this many positions are not attended
    n_streams: int = 1
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.d_ff is None:
            self.d_ff = 64 * math.ceil(8 * self.d_model / 3 / 64)
        checks = [
            (self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}"),
            (self.d_model % self.n_head == 0,
             f"d_model={self.d_model} must be divisible by n_head={self.n_head}"),
            (self.n_kv_head > 0 and self.n_head % self.n_kv_head == 0,
             f"n_head={self.n_head} must be a multiple of n_kv_head={self.n_kv_head}"),
            ((self.d_model // self.n_head) % 2 == 0,
             f"head width d_model/n_head={self.d_model // self.n_head} must be even for RoPE"),
            (self.sliding_window is None or self.sliding_window > 0,
             f"sliding_window must be a positive int or None, got {self.sliding_window}"),
            (self.n_streams >= 1, f"n_streams must be >= 1, got {self.n_streams}"),
            (0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Preallocated keys and values for every layer; `pos` is how many positions are filled."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_len > config.max_seq_len:
            raise ValueError(f"cache max_len={max_len} exceeds the model's "
                             f"max_seq_len={config.max_seq_len}")
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, G, S, D)
        self.v = torch.zeros(shape, device=device, dtype=dtype)  # (L, B, G, S, D)
        self.max_len = max_len
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def reorder(self, rows: Tensor) -> None:
        """Keep batch rows `rows` (B',) in that order, e.g. the surviving beams' parents."""
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so bf16 autocast does not lose the small-variance rows.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos and sin, each (max_len, head_dim), in the rotate-half layout Llama checkpoints use."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (S, D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (S, D)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by position; cos, sin (T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


def attention_mask(q_start: int, q_len: int, k_len: int, window: int | None,
                   device: torch.device) -> Tensor:
    """Boolean (T, S) mask, True where query q_start+i may attend key j (causal, banded)."""
    q_pos = torch.arange(q_start, q_start + q_len, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, S)
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= q_pos - k_pos < window
    return allowed


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, d = config, config.head_dim
        self.wq = nn.Linear(c.d_model, c.n_head * d, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_head * d, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_head * d, bias=False)
        self.wo = nn.Linear(c.n_head * d, c.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                layer: int) -> Tensor:
        c = self.config
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", d=c.head_dim)
        k = rearrange(self.wk(x), "b t (g d) -> b g t d", d=c.head_dim)
        v = rearrange(self.wv(x), "b t (g d) -> b g t d", d=c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        start, t = (cache.pos if cache is not None else 0), x.shape[1]
        if cache is not None:
            cache.k[layer, :, :, start:start + t] = k
            cache.v[layer, :, :, start:start + t] = v
            k = cache.k[layer, :, :, :start + t]  # (B, G, S, D)
            v = cache.v[layer, :, :, :start + t]
        dropout = c.dropout if self.training else 0.0
        if start == 0 and c.sliding_window is None:
            # Queries and keys line up: the fused causal kernel, no mask tensor.
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                 enable_gqa=c.n_kv_head != c.n_head)
        else:
            mask = attention_mask(start, t, k.shape[2], c.sliding_window, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 enable_gqa=c.n_kv_head != c.n_head)
        return self.wo(rearrange(out, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_up = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w_down = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None,
                layer: int) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Causal transformer over global token ids.

    forward(idx) takes (B, T) ids, or (B, K, T) when n_streams = K > 1, and returns logits
    (B, T, V), or (B, K, T, V). With a KVCache, idx holds only the new positions, which are
    appended at cache.pos; the cache advances by T.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        # The K stream embeddings live in one table, stream k at rows [k*V, (k+1)*V), so
        # summing K lookups is one gather; K=1 is exactly a plain embedding.
        self.embed = nn.Embedding(c.n_streams * c.vocab_size, c.d_model)
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.head = nn.Linear(c.d_model, c.n_streams * c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.head.weight = self.embed.weight
        cos, sin = rope_tables(c.head_dim, c.max_seq_len, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std), residual output projections scaled by depth."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w_down.weight")):
                # Each block adds two residual branches; keep the stream's variance O(1).
                nn.init.normal_(p, std=std / math.sqrt(2 * self.config.n_layer))
            else:
                nn.init.normal_(p, std=std)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.embed.weight
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len,
                       device=weight.device, dtype=weight.dtype)

    def forward(self, idx: Tensor, cache: KVCache | None = None) -> Tensor:
        c = self.config
        if c.n_streams == 1:
            if idx.dim() != 2:
                raise ValueError(f"expected idx of shape (B, T), got {tuple(idx.shape)}")
            x = self.embed(idx)  # (B, T, C)
        else:
            if idx.dim() != 3 or idx.shape[1] != c.n_streams:
                raise ValueError(f"expected idx of shape (B, {c.n_streams}, T), "
                                 f"got {tuple(idx.shape)}")
            offsets = torch.arange(c.n_streams, device=idx.device)[:, None] * c.vocab_size
            x = self.embed(idx + offsets).sum(dim=1)  # (B, T, C)
        start, t = (cache.pos if cache is not None else 0), x.shape[1]
        limit = cache.max_len if cache is not None else c.max_seq_len
        if start + t > limit:
            raise ValueError(f"sequence of {start + t} positions exceeds the limit of {limit} "
                             f"(model max_seq_len={c.max_seq_len})")
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer)
        if cache is not None:
            cache.pos = start + t
        logits = self.head(self.norm(x))  # (B, T, K*V)
        if c.n_streams == 1:
            return logits
        return rearrange(logits, "b t (k v) -> b k t v", k=c.n_streams)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
