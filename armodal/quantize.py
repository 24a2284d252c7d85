"""Weight-only quantization of a trained Transformer for inference: int8, int4 or bf16 weights.

    int8  every Linear and the embedding table as int8 rows times a per-row scale (symmetric);
          matmuls run in PyTorch's own CPU kernel aten._weight_int8pack_mm.
    int4  every Linear as 4-bit groups of `group_size` along the input axis, each group with its
          own scale and zero (asymmetric), through aten._weight_int4pack_mm_for_cpu; the
          embedding table (and a head tied to it) stays int8, as a lookup table cannot be read
          from the kernel's packed layout.
    bf16  every weight cast to bfloat16.

In all three modes activations, the KV cache and the norm weights are bfloat16 (RMSNorm still
normalises in float32, RoPE tables stay float32) and logits come back as float32. The int kernels
are only fast with bf16 activations: with float32 activations both were measured 5-200x slower
than a plain float32 matmul, with bf16 activations faster than it (on a CPU with AVX512-BF16).

A quantized model is for inference only: its forward refuses training mode, nothing requires
grad, and the int kernels have no backward. int8 and int4 run on CPU only. Casting or moving a
quantized model afterwards (model.float(), .to("cuda")) is not supported; quantize the model
where it will run.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from armodal.model import Transformer

QUANT_MODES = ("int8", "int4", "bf16")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the CPU int4 kernel accepts
DEFAULT_GROUP_SIZE = 128
COMPUTE_DTYPE = torch.bfloat16
aten = torch.ops.aten


def int8_rows(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric int8 per row: weight (N, K) ~= q (N, K) int8 * scale (N,) bf16.

    q is rounded against the bf16 scale the kernel will use, not the exact one."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(COMPUTE_DTYPE)  # (N,)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def int4_groups(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """Asymmetric 4-bit groups along K: q (N, K) int32 in [0, 15] and scales_and_zeros
    (K/g, N, 2) bf16, the layout the int4 kernel reads; it dequantizes (q - 8) * scale + zero."""
    n, k = weight.shape
    groups = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, K/g, g)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (N, K/g)
    scale = ((hi - lo) / 15).clamp(min=1e-6).to(COMPUTE_DTYPE)
    zero = (lo + 8 * scale.float()).to(COMPUTE_DTYPE)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8
    q = q.clamp(0, 15).to(torch.int32).reshape(n, k)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros


class Int8Linear(nn.Module):
    """y = x W^T with W held as int8 rows times a per-output-channel scale."""

    def __init__(self, weight_int8: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)  # (N, K) int8
        self.register_buffer("scale", scale)  # (N,) bf16

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, x.shape[-1]).to(self.scale.dtype)  # (B*T, K)
        out = aten._weight_int8pack_mm(x2d, self.weight_int8, self.scale)  # (B*T, N)
        return out.reshape(*x.shape[:-1], -1)


class Int8Embedding(nn.Module):
    """Embedding table as int8 rows + per-row scale; only the looked-up rows are dequantized."""

    def __init__(self, weight_int8: Tensor, scale: Tensor):
        super().__init__()
        self.register_buffer("weight_int8", weight_int8)  # (V, C) int8
        self.register_buffer("scale", scale)  # (V,) bf16

    @property
    def weight(self) -> Tensor:
        """Transformer reads embed.weight only for the device and dtype of its activations and
        KV cache; the scales carry both. The dense table no longer exists."""
        return self.scale

    def forward(self, idx: Tensor) -> Tensor:
        rows = self.weight_int8[idx]  # (..., C) int8
        return rows.to(self.scale.dtype) * self.scale[idx][..., None]


class Int4Linear(nn.Module):
    """y = x W^T with W held as 4-bit groups in the CPU int4 kernel's packed layout.

    That layout depends on the instruction set it was packed on (AVX512, AVX2, scalar), so the
    state dict holds plain nibbles (`weight_int4`, (N, K/2) uint8, even column in the low
    nibble) and loading repacks them for this machine."""

    def __init__(self, q: Tensor, scales_and_zeros: Tensor, group_size: int):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.group_size = group_size
        packed = aten._convert_weight_to_int4pack_for_cpu(q, 1)  # (N, K/2) uint8
        self.register_buffer("weight_packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros)  # (K/g, N, 2) bf16

    def forward(self, x: Tensor) -> Tensor:
        x2d = x.reshape(-1, self.in_features).to(self.scales_and_zeros.dtype)  # (B*T, K)
        out = aten._weight_int4pack_mm_for_cpu(x2d, self.weight_packed, self.group_size,
                                               self.scales_and_zeros)  # (B*T, N)
        return out.reshape(*x.shape[:-1], self.out_features)

    def unpacked(self) -> Tensor:
        """The 4-bit values q (N, K) int32, read back through the kernel itself: identity
        activations with scale 1 and zero 8 give (q - 8) * 1 + 8 = q exactly."""
        k, n, g = self.in_features, self.out_features, self.group_size
        eye = torch.eye(k, dtype=COMPUTE_DTYPE, device=self.weight_packed.device)  # (K, K)
        unit = torch.tensor([1.0, 8.0], dtype=COMPUTE_DTYPE, device=eye.device)
        unit = unit.expand(k // g, n, 2).contiguous()  # (K/g, N, 2)
        out = aten._weight_int4pack_mm_for_cpu(eye, self.weight_packed, g, unit)  # (K, N)
        return out.t().to(torch.int32)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        q = self.unpacked().to(torch.uint8)  # (N, K)
        destination[prefix + "weight_int4"] = q[:, 0::2] | (q[:, 1::2] << 4)  # (N, K/2)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight_int4"
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key not in state_dict:
            missing_keys.append(key)
            return
        nibbles = state_dict[key]  # (N, K/2) uint8
        expected = (self.out_features, self.in_features // 2)
        if nibbles.dtype != torch.uint8 or tuple(nibbles.shape) != expected:
            error_msgs.append(f"{key}: expected uint8 {expected}, got {nibbles.dtype} "
                              f"{tuple(nibbles.shape)}")
            return
        low, high = nibbles & 0x0F, nibbles >> 4
        q = torch.stack([low, high], dim=-1).reshape(self.out_features, -1)  # (N, K)
        self.weight_packed = aten._convert_weight_to_int4pack_for_cpu(
            q.to(torch.int32).to(self.weight_packed.device), 1)


def quantize_model(model: Transformer, mode: str, *,
                   group_size: int | None = None) -> Transformer:
    """Convert `model`'s weights in place for inference and return it (in eval mode).

    mode: one of QUANT_MODES. group_size: int4 only, the number of input features sharing one
    scale and zero (32, 64, 128 or 256; default 128). An int4 Linear whose shape the kernel
    cannot take (in_features not a multiple of group_size, or out_features not a multiple of
    16) falls back to int8, with a warning naming it. The mode is recorded in
    `model.quantization`, which save_run writes and load_run rebuilds."""
    check_mode(mode)
    if getattr(model, "quantization", None) is not None:
        raise ValueError(f"model is already quantized ({model.quantization}); quantize a "
                         f"full-precision model")
    if mode != "int4" and group_size is not None:
        raise ValueError(f"group_size={group_size} applies to int4 only, not to {mode!r}")
    if mode == "int4":
        group_size = DEFAULT_GROUP_SIZE if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, "
                             f"got {group_size}")
    device = model.embed.weight.device
    if mode != "bf16" and device.type != "cpu":
        raise ValueError(f"{mode} weights use PyTorch's CPU kernels; the model is on {device}. "
                         f"Quantize on CPU, or use 'bf16' on {device.type}")
    model.eval().requires_grad_(False)
    if mode != "bf16":
        _swap_int_modules(model, mode, group_size)
    for p in model.parameters():  # bf16: every weight; int8 / int4: the norm weights left
        p.data = p.data.to(COMPUTE_DTYPE)
    model.register_forward_pre_hook(_refuse_training)
    model.head.register_forward_hook(_float_logits)
    model.quantization = {"mode": mode, "group_size": group_size}
    return model


def check_mode(mode: str) -> None:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization mode {mode!r}; choose one of {QUANT_MODES}")


def _swap_int_modules(model: Transformer, mode: str, group_size: int | None) -> None:
    tied = model.head.weight is model.embed.weight
    model.embed = Int8Embedding(*int8_rows(model.embed.weight))
    if tied:  # one int8 table serves both the lookup and the output projection
        model.head = Int8Linear(model.embed.weight_int8, model.embed.scale)
    fallbacks = []
    for owner_name, owner in list(model.named_modules()):
        for name, child in list(owner.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            n, k = child.weight.shape
            if mode == "int4" and k % group_size == 0 and n % 16 == 0:
                setattr(owner, name, Int4Linear(*int4_groups(child.weight, group_size),
                                                group_size))
            else:
                setattr(owner, name, Int8Linear(*int8_rows(child.weight)))
                if mode == "int4":
                    fallbacks.append(f"{owner_name}.{name}".lstrip(".") + f" ({n}x{k})")
    if fallbacks:
        warnings.warn(f"int4 needs in_features divisible by group_size={group_size} and "
                      f"out_features divisible by 16; kept as int8: {', '.join(fallbacks)}",
                      stacklevel=3)


def _refuse_training(model: nn.Module, args) -> None:
    if model.training:
        raise RuntimeError(f"this model is quantized ({model.quantization['mode']}) for "
                           f"inference only; call model.eval(). Training a quantized model is "
                           f"not supported: train the full-precision model and quantize it after")


def _float_logits(head: nn.Module, args, logits: Tensor) -> Tensor:
    return logits.float()  # the kernels return bf16; losses and samplers expect float32


def weight_bytes(model: nn.Module) -> int:
    """Bytes the weights occupy: parameters plus the quantized modules' buffers, a tensor shared
    by two modules (tied embeddings) counted once. RoPE tables and caches are not weights."""
    quantized = (Int8Linear, Int8Embedding, Int4Linear)
    tensors = {id(p): p for p in model.parameters()}
    for module in model.modules():
        if isinstance(module, quantized):
            tensors.update({id(b): b for b in module.buffers(recurse=False)})
    return sum(t.numel() * t.element_size() for t in tensors.values())
