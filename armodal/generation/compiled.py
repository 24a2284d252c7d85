"""A torch.compile'd single-token decode step over the static KV cache.

Why not compile Transformer.forward: it slices the cache with the Python int cache.pos
(`cache.k[layer, :, :, :start + t]`), so a compiled forward specialises on every length and
recompiles at each step. The step here keeps every shape constant while the sequence grows:
one token per row, written into its slot of the full static cache, attending over all S slots
with a mask built from `cache.slot_pos` (-1 marks empty and pad slots, so unwritten slots are
never seen). The slot is a tensor, not an int, so it is data to the graph, not a constant:
one compile per (architecture, batch size, cache length), none per step. The weights are
graph inputs too, so another model of the same architecture reuses the graph.

It calls the model's own submodules (embed, norms, wq/wk/wv/wo, mlp, head), never `.weight`,
so a model whose Linear layers were swapped for same-signature modules (quantisation) still
runs. Python bookkeeping (cache.pos) stays outside the graph.

Dynamo keeps one cache entry per guard set on `decode_step`; past
torch._dynamo.config.recompile_limit distinct (architecture, batch, cache length) combinations
it falls back to running decode_step eagerly, which gives the same output, only slower.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from armodal.model import KVCache, additive_mask, apply_rope, attention_allowed, rope_at

__all__ = ["COMPILE_OPTIONS", "CompiledStep", "cache_len", "compiled_step", "decode_step"]

# fullgraph: a graph break is an error, not a silent slowdown; dynamic=False: every shape is
# static by design. Default inductor mode: on CPU (20M model, fp32) max-autotune-no-cudagraphs
# and cpp_wrapper were within noise of it (~10% faster than eager per token, all three).
COMPILE_OPTIONS: dict = dict(fullgraph=True, dynamic=False)


def decode_step(model: nn.Module, tokens: Tensor, positions: Tensor, slot: Tensor,
                k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor) -> Tensor:
    """One token per row through `model`, over a static cache; the function that is compiled.

    tokens (B, 1) ids; positions (B, 1) each row's token position (>= 0; rows of a left-padded
    batch differ); slot (1,) long, the cache slot this step fills. k_cache, v_cache
    (L, B, G, S, D) and slot_pos (B, S) are written in place at `slot`.
    Returns logits (B, 1, V), as model(tokens, cache, positions=positions) would in eval
    mode (decoding only: dropout is never applied).
    """
    x = model.embed(tokens)  # (B, 1, C)
    cos, sin = rope_at(positions, model.rope_inv_freq, model.rope_scale)  # (B, 1, D) each
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, 1, D): broadcast over heads
    slot_pos.index_copy_(1, slot, positions)  # before the mask: a query sees its own key
    allowed = attention_allowed(positions, slot_pos, model.config.sliding_window)  # (B,1,1,S)
    for layer, block in enumerate(model.blocks):
        x = x + _attend(block.attn, block.attn_norm(x), cos, sin, allowed, slot,
                        k_cache, v_cache, layer)
        x = x + block.mlp(block.mlp_norm(x))
    return model.head(model.norm(x))  # (B, 1, V)


def _attend(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor, allowed: Tensor,
            slot: Tensor, k_cache: Tensor, v_cache: Tensor, layer: int) -> Tensor:
    """Attention of layer `layer`: x (B, 1, C); k_cache, v_cache (L, B, G, S, D)."""
    c = attn.config
    q = rearrange(attn.wq(x), "b t (h d) -> b h t d", d=c.head_dim)  # (B, H, 1, D)
    k = rearrange(attn.wk(x), "b t (g d) -> b g t d", d=c.head_dim)  # (B, G, 1, D)
    v = rearrange(attn.wv(x), "b t (g d) -> b g t d", d=c.head_dim)  # (B, G, 1, D)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Written through the whole (L, B, G, S, D) input with a tensor layer index, not into the
    # view k_cache[layer]: inductor then updates the cache in place, where a write into the
    # view is functionalised into a copy of the layer plus a copy back, every step.
    at = torch.full((1,), layer, dtype=torch.long, device=slot.device)
    k_cache[at, :, :, slot] = k.permute(2, 0, 1, 3)  # (1, B, G, D)
    v_cache[at, :, :, slot] = v.permute(2, 0, 1, 3)
    out = F.scaled_dot_product_attention(q, k_cache[layer], v_cache[layer],
                                         attn_mask=additive_mask(allowed, q.dtype),
                                         enable_gqa=c.n_kv_head != c.n_head)  # (B, H, 1, D)
    return attn.wo(rearrange(out, "b h t d -> b t (h d)"))


class CompiledStep:
    """step(tokens, cache, positions) -> logits (B, 1, V): model(tokens, cache,
    positions=positions) for one new token per row, through the compiled decode_step.

    Holds the model by weak reference: it is cached per model (compiled_step) and must not
    keep the model alive, nor travel with it through deepcopy, pickling or state_dict.
    """

    def __init__(self, model: nn.Module, **options):
        if model.config.n_streams != 1:
            raise ValueError(f"compiled decoding supports n_streams=1 models; this one has "
                             f"n_streams={model.config.n_streams}")
        self._model = weakref.ref(model)
        self.options = {**COMPILE_OPTIONS, **options}
        self._fn = torch.compile(decode_step, **self.options)

    def __call__(self, tokens: Tensor, cache: KVCache, positions: Tensor) -> Tensor:
        if not cache.static:
            raise ValueError("compiled decoding needs a static KV cache; a rolling cache "
                             "(sliding-window decoding past max_seq_len) or a sink cache "
                             "(attention_sinks) is eager-only")
        if tokens.shape != (cache.k.shape[1], 1) or positions.shape != tokens.shape:
            raise ValueError(f"compiled step takes tokens and positions of shape (B, 1) = "
                             f"({cache.k.shape[1]}, 1); got {tuple(tokens.shape)} and "
                             f"{tuple(positions.shape)}")
        if cache.pos >= cache.max_len:
            raise ValueError(f"the KV cache is full ({cache.max_len} slots); no room for "
                             f"another step")
        slot = torch.full((1,), cache.pos, dtype=torch.long, device=tokens.device)
        logits = self._fn(self._model(), tokens, positions, slot, cache.k, cache.v,
                          cache.slot_pos)
        cache.pos += 1
        return logits


# model -> its CompiledStep; weak both ways, so a dropped model frees its entry.
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_step(model: nn.Module, **options) -> CompiledStep:
    """The model's CompiledStep, created on first use and then reused, so repeated
    generate() calls run the graphs already compiled. It lives beside the model, not on it:
    never in its state_dict, module tree or copies.

    options are passed to torch.compile over COMPILE_OPTIONS; other options than the cached
    step's give a fresh CompiledStep.
    """
    step = _STEPS.get(model)
    if step is None or step.options != {**COMPILE_OPTIONS, **options}:
        step = _STEPS[model] = CompiledStep(model, **options)
    return step


def cache_len(total: int, max_seq_len: int, smallest: int = 64) -> int:
    """Static cache length for a request of `total` positions: the next power of two (at least
    `smallest`, at most max_seq_len). A compiled graph is specialised to its cache length, so
    buckets let requests of similar lengths share one graph (at most ~log2(max_seq_len)
    graphs per batch size) at the price of attending over at most 2x the slots."""
    return min(max_seq_len, max(smallest, 1 << (total - 1).bit_length()))
