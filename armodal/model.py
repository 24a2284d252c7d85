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


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 so bf16 autocast does not lose the small-variance rows.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


ROPE_SCALINGS = ("linear", "ntk", "yarn")


def rope_inv_freq(head_dim: int, theta: float) -> Tensor:
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def scaled_rope(config: ModelConfig) -> tuple[Tensor, float]:
    """RoPE's inverse frequencies (D/2,) under the config's context-extension scaling, and the
    factor cos and sin are multiplied by (YaRN's attention temperature; 1 otherwise).
    Formulas as in Hugging Face transformers' rope utils, so exported models agree."""
    d, theta, factor = config.head_dim, config.rope_theta, config.rope_factor
    if config.rope_scaling is None or factor == 1.0:
        return rope_inv_freq(d, theta), 1.0
    if config.rope_scaling == "linear":  # positions squeezed into the trained range
        return rope_inv_freq(d, theta) / factor, 1.0
    if config.rope_scaling == "ntk":  # a larger base: high frequencies kept, low ones stretched
        return rope_inv_freq(d, theta * factor ** (d / (d - 2))), 1.0
    # YaRN: dimensions that turn many times within the trained context keep their frequency
    # (extrapolate), those that turn less than once are interpolated, a linear ramp between.
    original = config.rope_original_len or round(config.max_seq_len / factor)

    def dim_at(rotations: float) -> float:  # the dimension that turns `rotations` times
        return d * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_at(32)), 0), min(math.ceil(dim_at(1)), d - 1)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / max(high - low, 1e-3))
    extrapolate = 1 - ramp.clamp(0, 1)  # (D/2,): 1 keeps the frequency, 0 divides by factor
    inv_freq = rope_inv_freq(d, theta)
    inv_freq = inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, 0.1 * math.log(factor) + 1.0


def rope_at(positions: Tensor, inv_freq: Tensor, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """cos and sin (..., D) for integer positions (...), rotate-half layout as in Llama;
    `scale` multiplies both (YaRN sharpens attention by scale**2 this way)."""
    angles = positions.float()[..., None] * inv_freq  # (..., D/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., D)
    if scale == 1.0:
        return angles.cos(), angles.sin()
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, H, T, D) rotated by position; cos, sin (T, D) or (B, 1, T, D)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


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
        return KVCache(self.config, batch_size, max_len or default, device=weight.device,
                       dtype=weight.dtype, rolling=rolling, sinks=sinks)

    def forward(self, idx: Tensor, cache: KVCache | None = None,
                positions: Tensor | None = None) -> Tensor:
        """positions (B, T): token positions of a left-padded ragged batch, -1 on pads.
        None means every row's tokens sit at cache.pos + [0, T) (no padding)."""
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
