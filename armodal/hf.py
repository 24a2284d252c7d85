"""Import and export Llama-format Hugging Face checkpoint directories.

A Llama checkpoint directory holds `config.json` and the weights as one `model.safetensors` or
as shards listed in `model.safetensors.index.json`. Llama's architecture is armodal's
Transformer with n_streams = 1 (pre-norm RMSNorm, rotate-half RoPE, SwiGLU, GQA, no biases),
so converting is renaming tensors and translating config fields. Weights are read with
`safetensors.safe_open` only (never pickle), and `transformers` is not imported: it is a test
and benchmark dependency, not a runtime one.

Accepted model types: "llama", and "mistral" (Llama plus sliding-window attention, which maps
to ModelConfig.sliding_window). Anything that would make the logits differ (rope scaling,
biases, another activation, quantized weights) is refused with a ValueError naming it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from armodal.checkpoint import atomic_write_text
from armodal.model import ModelConfig, Transformer

__all__ = ["load_llama", "save_llama", "config_from_hf", "config_to_hf"]

ACCEPTED_TYPES = ("llama", "mistral")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"

# Hugging Face tensor name -> armodal name; {i} is the layer index.
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn.wq.weight",
    "self_attn.k_proj.weight": "attn.wk.weight",
    "self_attn.v_proj.weight": "attn.wv.weight",
    "self_attn.o_proj.weight": "attn.wo.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight",
    "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
}
_TOP_NAMES = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "head.weight",
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Derived buffers some older checkpoints saved; they are recomputed, never loaded.
_IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def _to_armodal_name(name: str) -> str | None:
    """The armodal parameter name for a Hugging Face tensor name, or None if it has none."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blocks.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _to_hf_name(name: str) -> str:
    """The Hugging Face tensor name for an armodal parameter name."""
    top = {v: k for k, v in _TOP_NAMES.items()}
    if name in top:
        return top[name]
    layer = {v: k for k, v in _LAYER_NAMES.items()}
    _, index, rest = name.split(".", 2)  # "blocks", i, "attn.wq.weight"
    return f"model.layers.{index}.{layer[rest]}"


def config_from_hf(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """Translate a Llama/Mistral `config.json` dict into a ModelConfig.

    Raises ValueError for a model type other than llama/mistral and for every setting that
    armodal's Transformer does not compute the same way (rope scaling, biases, activation,
    head_dim != hidden_size / num_attention_heads, quantization).
    """
    model_type = hf.get("model_type")
    if model_type not in ACCEPTED_TYPES:
        raise ValueError(f"config.json has model_type={model_type!r}; load_llama reads "
                         f"{ACCEPTED_TYPES}")
    hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
    problems = []
    # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling.
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = rope_scaling_from_hf(rope, rope_type, problems)
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            problems.append(f"{flag}=true is unsupported (armodal's linear layers have no bias)")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={hf['hidden_act']!r} is unsupported (only 'silu')")
    if hf.get("head_dim") is not None and hf["head_dim"] != hidden // heads:
        problems.append(f"head_dim={hf['head_dim']} is unsupported: it must equal "
                        f"hidden_size / num_attention_heads = {hidden // heads}")
    if hf.get("quantization_config") is not None:
        problems.append("quantization_config is set; quantized checkpoints are unsupported")
    if problems:
        raise ValueError("cannot load this checkpoint: " + "; ".join(problems))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        n_layer=hf["num_hidden_layers"],
        n_head=heads,
        n_kv_head=hf.get("num_key_value_heads") or heads,
        d_model=hidden,
        d_ff=hf["intermediate_size"],
        max_seq_len=max_seq_len or hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        **scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=hf.get("sliding_window") if model_type == "mistral" else None,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
    )


# The RoPE scalings both sides compute alike, and the keys each may carry (at their defaults).
HF_ROPE_KEYS = {"linear": {"factor"},
                "yarn": {"factor", "original_max_position_embeddings", "truncate", "beta_fast",
                         "beta_slow"}}
HF_YARN_DEFAULTS = {"truncate": True, "beta_fast": 32, "beta_slow": 1}


def rope_scaling_from_hf(rope: dict, rope_type: str, problems: list[str]) -> dict:
    """ModelConfig's rope_scaling fields for a Hugging Face rope dict; what armodal does not
    compute the same way is appended to `problems`."""
    if rope_type == "default":
        return {}
    extra = set(rope) - HF_ROPE_KEYS.get(rope_type, set()) - {"rope_type", "type", "rope_theta"}
    off_default = [k for k, v in HF_YARN_DEFAULTS.items()
                   if rope_type == "yarn" and rope.get(k, v) not in (v, None)]
    if rope_type not in HF_ROPE_KEYS or extra or off_default:
        problems.append(f"rope parameters {rope!r} are unsupported: armodal computes rope_type "
                        f"'default', 'linear', and 'yarn' with factor and "
                        f"original_max_position_embeddings only")
        return {}
    return {"rope_scaling": rope_type, "rope_factor": float(rope["factor"]),
            "rope_original_len": rope.get("original_max_position_embeddings")}


def rope_to_hf(config: ModelConfig) -> dict:
    """rope_parameters for a ModelConfig. NTK-aware scaling is plain RoPE at a larger theta."""
    theta, factor = config.rope_theta, config.rope_factor
    if config.rope_scaling is None or factor == 1.0:
        return {"rope_type": "default", "rope_theta": theta}
    if config.rope_scaling == "ntk":
        d = config.head_dim
        return {"rope_type": "default", "rope_theta": theta * factor ** (d / (d - 2))}
    rope = {"rope_type": config.rope_scaling, "rope_theta": theta, "factor": factor}
    if config.rope_scaling == "yarn":
        rope["original_max_position_embeddings"] = \
            config.rope_original_len or round(config.max_seq_len / factor)
    return rope


def config_to_hf(config: ModelConfig, dtype: torch.dtype, bos_token_id: int | None = None,
                 eos_token_id: int | None = None, pad_token_id: int | None = None) -> dict:
    """The `config.json` dict for a ModelConfig: Llama, or Mistral with a sliding window."""
    mistral = config.sliding_window is not None
    rope = rope_to_hf(config)
    hf = {
        "architectures": ["MistralForCausalLM" if mistral else "LlamaForCausalLM"],
        "model_type": "mistral" if mistral else "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # rope_theta + rope_scaling for transformers < 5, rope_parameters for >= 5.
        "rope_theta": rope["rope_theta"],
        "rope_parameters": rope,
        "rope_scaling": None if rope["rope_type"] == "default" else
        {k: v for k, v in rope.items() if k != "rope_theta"},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": config.init_std,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
    }
    if mistral:
        hf["sliding_window"] = config.sliding_window
    return hf


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: the index's shards, or every file."""
    index = path / INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{str(path)!r} has no *.safetensors weights (pickled .bin "
                                f"checkpoints are not read; convert them to safetensors)")
    return files


def load_llama(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, max_seq_len: int | None = None) -> Transformer:
    """Load a Llama-format Hugging Face checkpoint directory as an armodal Transformer.

    Args:
        path: directory with config.json and model.safetensors (or sharded safetensors with
            model.safetensors.index.json).
        device: where the returned model lives.
        dtype: cast every weight to this dtype (e.g. torch.float32); None keeps the
            checkpoint's dtype.
        max_seq_len: context length of the returned model; None uses max_position_embeddings.
            (RoPE tables are precomputed for it, so a smaller value saves memory.)

    Returns the model in eval mode. Raises ValueError for an unsupported config (see
    config_from_hf), and for missing, unexpected or wrongly shaped tensors (all listed).
    """
    path = Path(path).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json; expected a Hugging Face "
                                f"checkpoint directory")
    config = config_from_hf(json.loads(config_path.read_text()), max_seq_len)

    state: dict[str, torch.Tensor] = {}
    unexpected = []
    for file in _weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                ours = _to_armodal_name(name)
                if ours is None:
                    if not _IGNORED.fullmatch(name):
                        unexpected.append(name)
                    continue
                state[ours] = f.get_tensor(name)

    model = Transformer(config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if config.tie_embeddings:
        # One shared tensor: the checkpoint stores it as embed_tokens (lm_head, if present
        # too, must be the same values).
        head = state.pop("head.weight", None)
        if head is not None and "embed.weight" in state and \
                not torch.equal(head, state["embed.weight"]):
            unexpected.append("lm_head.weight (differs from embed_tokens although "
                              "tie_word_embeddings is true)")
        del expected["head.weight"]
    missing = sorted(_to_hf_name(n) for n in expected.keys() - state.keys())
    wrong_shape = [f"{_to_hf_name(n)} {tuple(t.shape)} (expected {tuple(expected[n])})"
                   for n, t in sorted(state.items()) if t.shape != expected[n]]
    if missing or unexpected or wrong_shape:
        raise ValueError(f"checkpoint {str(path)!r} does not match its config.json: missing "
                         f"{missing}, unexpected {sorted(unexpected)}, wrong shape {wrong_shape}")

    dtype = dtype or state["embed.weight"].dtype
    model = model.to(dtype)
    model.load_state_dict({n: t.to(dtype) for n, t in state.items()},
                          strict=not config.tie_embeddings)
    return model.to(device).eval()


def save_llama(model: Transformer, path: str | Path, dtype: torch.dtype | None = None,
               bos_token_id: int | None = None, eos_token_id: int | None = None,
               pad_token_id: int | None = None) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + model.safetensors).

    The result loads with `transformers.AutoModelForCausalLM.from_pretrained(path)` as a
    LlamaForCausalLM (MistralForCausalLM when the model uses a sliding window). Tied
    embeddings are written once, as embed_tokens, with tie_word_embeddings true.

    Args:
        model: a Transformer with n_streams == 1.
        path: the directory (created if needed; existing files of the same name are replaced).
        dtype: cast the weights to this dtype; None keeps the model's.
        bos_token_id, eos_token_id, pad_token_id: written to config.json when given.

    Raises ValueError for a multi-stream model (Llama has one embedding and one head).
    """
    config = model.config
    if config.n_streams != 1:
        raise ValueError(f"model has n_streams={config.n_streams}; a Llama checkpoint has one "
                         f"token stream, so only n_streams=1 models can be exported")
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    dtype = dtype or model.embed.weight.dtype
    tensors = {_to_hf_name(name): t.detach().to("cpu", dtype).contiguous()
               for name, t in model.state_dict().items()
               if not (config.tie_embeddings and name == "head.weight")}
    (path / "config.json").unlink(missing_ok=True)  # no stale config beside new weights
    tmp = path / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path / WEIGHTS)
    hf = config_to_hf(config, dtype, bos_token_id, eos_token_id, pad_token_id)
    atomic_write_text(path / "config.json", json.dumps(hf, indent=2) + "\n")
    return path
