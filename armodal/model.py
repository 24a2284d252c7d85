"""The one causal transformer armodal trains on every modality.

Decoder-only, pre-norm, RMSNorm, rotary position embeddings (armodal/rope.py), SwiGLU MLP,
grouped-query attention, optional sliding-window attention and a preallocated KV cache for
decoding (armodal/kv_cache.py).

Axis legend for the shape comments and einops patterns:
    B batch, T time (query positions), S cache / key positions, K parallel token streams,
    V vocabulary, C model width (d_model), H query heads, G key/value heads, D head width.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

# Re-exported: decoding code imports the cache and RoPE helpers from here.
from armodal.kv_cache import KVCache, max_sink_slots
from armodal.rope import ROPE_SCALINGS, apply_rope, rope_at, scaled_rope


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
    # Context extension at inference: positions past the trained length by rescaling RoPE.
    # None | "linear" (position interpolation) | "ntk" (NTK-aware: a larger theta) | "yarn"
    # (NTK-by-parts interpolation + attention temperature); rope_factor 1 is no scaling.
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_original_len: int | None = None  # yarn: the trained context; None: max_seq_len / factor
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
            (self.n_layer >= 1 and self.n_head >= 1 and self.d_model >= 1,
             f"n_layer, n_head and d_model must be >= 1, got {self.n_layer}, {self.n_head} and "
             f"{self.d_model}"),
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
            (self.rope_scaling in (None, *ROPE_SCALINGS),
             f"rope_scaling={self.rope_scaling!r}; allowed: null, {', '.join(ROPE_SCALINGS)}"),
            (self.rope_factor >= 1.0, f"rope_factor must be >= 1, got {self.rope_factor}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid ModelConfig: {message}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so bf16 autocast does not lose the small-variance rows.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def attention_allowed(q_pos: Tensor, k_pos: Tensor, window: int | None,
                      sinks: int = 0) -> Tensor:
    """Bool (B, 1, T, S): True where query position q may attend key position k.

    q_pos (B|1, T) and k_pos (B|1, S) are token positions, -1 for padding / empty slots.
    Allowed: 0 <= k <= q, and q - k < window or k < sinks (attention sinks).
    """
    q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
    allowed = (k >= 0) & (k <= q)
    if window is not None:
        allowed &= (q - k < window) | (k < sinks)
    return allowed[:, None]


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """0 where allowed, else the dtype's most negative finite value (not -inf): a pad query
    with nothing to attend to then gives finite, ignored values, never NaNs in the cache."""
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c, d = config, config.head_dim
        self.wq = nn.Linear(c.d_model, c.n_head * d, bias=False)
        self.wk = nn.Linear(c.d_model, c.n_kv_head * d, bias=False)
        self.wv = nn.Linear(c.d_model, c.n_kv_head * d, bias=False)
        self.wo = nn.Linear(c.n_head * d, c.d_model, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int,
                mask: Tensor | None = None) -> Tensor:
        """mask: None for plain causal attention over [0, T) or over the whole filled cache,
        else a bool (B, 1, T, S) of the keys each query may attend to (attention_allowed)."""
        c = self.config
        q = rearrange(self.wq(x), "b t (h d) -> b h t d", d=c.head_dim)
        k = rearrange(self.wk(x), "b t (g d) -> b g t d", d=c.head_dim)
        v = rearrange(self.wv(x), "b t (g d) -> b g t d", d=c.head_dim)
        q = apply_rope(q, cos, sin)
        start, t = (cache.pos if cache is not None else 0), x.shape[1]
        causal = mask is None and start == 0
        if cache is not None and cache.sinks is not None:
            # Stored before RoPE, all slots rotated to their cache positions (KVCache.place).
            k, v = cache.write_unrotated(layer, k, v)  # (B, G, S, D)
        else:
            k = apply_rope(k, cos, sin)
        if cache is not None and cache.rolling:
            # Attend over the ring plus the new keys, then keep the newest max_len in the ring.
            keys, values = torch.cat([cache.k[layer], k], 2), torch.cat([cache.v[layer], v], 2)
            keep = min(t, cache.max_len)
            slots = cache.slots(t)[-keep:]
            cache.k[layer][:, :, slots] = k[:, :, -keep:]
            cache.v[layer][:, :, slots] = v[:, :, -keep:]
            k, v = keys, values  # (B, G, S + T, D)
        elif cache is not None and cache.static:
            cache.k[layer, :, :, start:start + t] = k
            cache.v[layer, :, :, start:start + t] = v
            k = cache.k[layer, :, :, :start + t]  # (B, G, S, D)
            v = cache.v[layer, :, :, :start + t]
        dropout = c.dropout if self.training else 0.0
        gqa = c.n_kv_head != c.n_head
        if mask is not None:
            mask = additive_mask(mask, q.dtype)  # q's dtype: bf16 under autocast
        # No mask and queries start at 0: the fused causal kernel. No mask later on (one new
        # token, no padding, no window): every cached key is visible, no mask tensor needed.
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                             dropout_p=dropout, enable_gqa=gqa)
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
                layer: int, mask: Tensor | None = None) -> Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin, cache, layer, mask))
        return x + self.drop(self.mlp(self.mlp_norm(x)))


class Transformer(nn.Module):
    """Causal transformer over global token ids.

    forward(idx) takes (B, T) ids, or (B, K, T) when n_streams = K > 1, and returns logits
    (B, T, V), or (B, K, T, V). With a KVCache, idx holds only the new positions, which are
    appended at cache.pos; the cache advances by T.
    """

    # The ranks the attention heads are split over: armodal.parallel sets it when it applies
    # tensor parallelism, so that a KV cache holds only this rank's n_kv_head / tp_size heads.
    tp_size = 1

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
        self.set_positions(c)
        self.reset_parameters()

    def set_positions(self, config: ModelConfig) -> None:
        """Use `config`'s max_seq_len and RoPE scaling: the RoPE tables are rebuilt, the
        weights are untouched (RoPE has no learned position table). Context extension."""
        device = self.embed.weight.device
        inv_freq, self.rope_scale = scaled_rope(config)
        cos, sin = rope_at(torch.arange(config.max_seq_len), inv_freq, self.rope_scale)  # (S, D)
        self.register_buffer("rope_inv_freq", inv_freq.to(device), persistent=False)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)
        self.config = config

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

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  rolling: bool = False, sinks: int | None = None) -> KVCache:
        """A static cache of max_len (default max_seq_len) slots, or a rolling ring (default
        size: the sliding window) that lets a sliding-window model decode indefinitely, or
        with `sinks` a sink cache of max_len slots (the first `sinks` positions plus a ring of
        the recent max_len - sinks) that lets any model decode indefinitely."""
        weight = self.embed.weight
        default = self.config.sliding_window if rolling else self.config.max_seq_len
        if sinks is not None:
            default = max_sink_slots(self.config, sinks)
        config = self.config
        if self.tp_size > 1:  # this rank's heads; d_model shrinks alike, so head_dim stays
            config = replace(config, n_head=config.n_head // self.tp_size,
                             n_kv_head=config.n_kv_head // self.tp_size,
                             d_model=config.d_model // self.tp_size)
        return KVCache(config, batch_size, max_len or default, device=weight.device,
                       dtype=weight.dtype, rolling=rolling, sinks=sinks)

    def forward(self, idx: Tensor, cache: KVCache | None = None,
                positions: Tensor | None = None, prefix: Tensor | None = None) -> Tensor:
        """positions (B, T): token positions of a left-padded ragged batch, -1 on pads.
        None means every row's tokens sit at cache.pos + [0, T) (no padding).
        prefix (B, P, C): embeddings placed before the tokens, at positions [0, P) (an encoder
        adapter's output: armodal/prefix.py); they take positions but get no logits."""
        c = self.config
        if cache is not None and cache.sinks is not None and idx.shape[-1] > 1:
            pieces = cache.pieces(idx.shape[-1], positions)
            if len(pieces) > 1:  # a prompt longer than the sink cache
                return torch.cat([self(idx[..., a:b], cache,
                                       None if positions is None else positions[:, a:b])
                                  for a, b in pieces], dim=-2)
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
        if prefix is not None:
            if positions is not None or c.n_streams != 1:
                raise ValueError("prefix embeddings take one stream of unpadded rows")
            x = torch.cat([prefix.to(x.dtype), x], dim=1)  # (B, P + T, C)
        start, t = (cache.pos if cache is not None else 0), x.shape[1]
        bounded = cache is not None and not cache.static  # a ring: no length limit
        if not bounded and start + t > (cache.max_len if cache is not None else c.max_seq_len):
            limit = cache.max_len if cache is not None else c.max_seq_len
            raise ValueError(f"sequence of {start + t} positions exceeds the limit of {limit} "
                             f"(model max_seq_len={c.max_seq_len}; only sliding-window models "
                             f"decode past it, with a rolling cache)")
        q_pos, cos, sin, mask = self._rope_and_mask(start, t, positions, cache)
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, cos, sin, cache, layer, mask)
        if cache is not None and cache.sinks is None:  # a sink cache placed them up front
            keep = min(t, cache.max_len)
            cache.slot_pos[:, cache.slots(t)[-keep:]] = q_pos[:, -keep:]  # (1|B, T) broadcasts
        if cache is not None:
            cache.padded |= positions is not None and bool((positions < 0).any())
            cache.pos = start + t
        if prefix is not None:
            x = x[:, prefix.shape[1]:]  # (B, T, C): logits for the tokens only
        logits = self.head(self.norm(x))  # (B, T, K*V)
        if c.n_streams == 1:
            return logits
        return rearrange(logits, "b t (k v) -> b k t v", k=c.n_streams)

    def _rope_and_mask(self, start: int, t: int, positions: Tensor | None,
                       cache: KVCache | None):
        """Query positions (1|B, T), RoPE tables for them, and the attention mask (None when
        not needed)."""
        c, device = self.config, self.embed.weight.device
        if cache is not None and cache.sinks is not None:
            return self._sink_rope_and_mask(start, t, positions, cache)
        if positions is None:
            q_pos = torch.arange(start, start + t, device=device)[None]  # (1, T)
            if start + t <= c.max_seq_len:
                cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
            else:
                # past the table: rolling
                cos, sin = rope_at(q_pos[0], self.rope_inv_freq, self.rope_scale)
        else:
            q_pos = positions  # (B, T)
            cos, sin = rope_at(positions.clamp(min=0), self.rope_inv_freq,
                               self.rope_scale)  # (B, T, D)
            cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D)
        padded = positions is not None or (cache is not None and cache.padded)
        if not padded and c.sliding_window is None and not (cache is not None and cache.rolling):
            # Plain causal: the fused kernel at start 0, or one new token seeing all the cache.
            if start == 0 or t == 1:
                return q_pos, cos, sin, None
        if cache is None:
            k_pos = q_pos
        elif cache.rolling:
            k_pos = torch.cat([cache.slot_pos, q_pos.expand(cache.slot_pos.shape[0], t)], 1)
        else:
            k_pos = torch.cat([cache.slot_pos[:, :start],
                               q_pos.expand(cache.slot_pos.shape[0], t)], 1)
        return q_pos, cos, sin, attention_allowed(q_pos, k_pos, c.sliding_window)

    def _sink_rope_and_mask(self, start: int, t: int, positions: Tensor | None,
                            cache: KVCache):
        """_rope_and_mask for a sink cache: the new tokens are placed first, queries and keys
        are rotated to positions inside the cache (KVCache.place says why), the mask allows
        the sinks and the recent window by the tokens' true positions."""
        if positions is None:
            q_pos = torch.arange(start, start + t, device=self.embed.weight.device)[None]
        else:
            q_pos = positions  # (B, T)
        q_cache, k_cache = cache.place(q_pos)  # (B, T), (B, S): all < max_len <= max_seq_len
        cache.key_rope = self.rope_cos[k_cache][:, None], self.rope_sin[k_cache][:, None]
        cos, sin = self.rope_cos[q_cache][:, None], self.rope_sin[q_cache][:, None]  # (B,1,T,D)
        window = cache.max_len - cache.sinks
        return q_pos, cos, sin, attention_allowed(q_pos, cache.slot_pos, window, cache.sinks)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
