"""armodal vs Hugging Face transformers on the same weights: import, export, greedy decoding."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from armodal.generation import DecodingConfig, generate
from armodal.hf import load_llama, save_llama
from armodal.model import ModelConfig, Transformer

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def hf_model(tied: bool = False, rope_theta: float = 10000.0, seed: int = 0, kind: str = "llama",
             **overrides):
    """A random-weight tiny LlamaForCausalLM (or Mistral), weights large enough that greedy
    argmaxes are not near-ties, and norm weights away from 1 so a swapped norm shows."""
    torch.manual_seed(seed)
    if kind == "mistral":
        config = transformers.MistralConfig(**TINY, tie_word_embeddings=tied,
                                            rope_theta=rope_theta, **overrides)
        model = transformers.MistralForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied,
                                          rope_theta=rope_theta, **overrides)
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model.eval()


def random_ids(seed: int = 1, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (batch, length),
                         generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def ours_logits(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """One saved untied tiny Llama, reused by the bad-config tests (which edit a copy)."""
    path = tmp_path_factory.mktemp("llama")
    hf_model().save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture
def llama_copy(llama_dir, tmp_path) -> Path:
    return Path(shutil.copytree(llama_dir, tmp_path / "copy"))


@pytest.mark.parametrize("tied, rope_theta", [(False, 10000.0), (True, 500000.0)])
def test_import_matches_hf_logits(tmp_path, tied, rope_theta):
    hf = hf_model(tied, rope_theta)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_llama(tmp_path)
    assert ours.config.tie_embeddings == tied and ours.config.rope_theta == rope_theta
    assert ours.config.n_kv_head == 2 and ours.config.d_ff == 128
    if tied:
        assert ours.head.weight is ours.embed.weight
    ids = random_ids()
    torch.testing.assert_close(ours_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_export_loads_in_transformers(tmp_path, tied):
    torch.manual_seed(2)
    ours = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                   d_ff=128, max_seq_len=64, rope_theta=500000.0,
                                   tie_embeddings=tied, init_std=0.15))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
    save_llama(ours.eval(), tmp_path, eos_token_id=3)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["architectures"] == ["LlamaForCausalLM"] and meta["tie_word_embeddings"] == tied
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.eos_token_id == 3
    ids = random_ids(seed=3)
    torch.testing.assert_close(hf_logits(hf, ids), ours_logits(ours, ids), atol=1e-4, rtol=0)
    again = load_llama(tmp_path)
    for name, t in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name


def test_greedy_generate_matches_hf(tmp_path):
    hf = hf_model(seed=4)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_llama(tmp_path)
    prompts = random_ids(seed=5, batch=2, length=8)
    with torch.no_grad():
        expected = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                               max_new_tokens=20, pad_token_id=0)[:, prompts.shape[1]:]
    got = generate(ours, prompts, DecodingConfig(strategy="greedy", max_new_tokens=20))
    assert got.sequences == expected.tolist()


def test_sharded_checkpoint_loads(tmp_path):
    hf = hf_model(seed=6)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = random_ids(seed=7)
    torch.testing.assert_close(ours_logits(load_llama(tmp_path), ids), hf_logits(hf, ids),
                               atol=1e-4, rtol=0)


def test_mistral_sliding_window_matches_hf(tmp_path):
    hf = hf_model(seed=8, kind="mistral", sliding_window=6)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_llama(tmp_path)
    assert ours.config.sliding_window == 6
    ids = random_ids(seed=9)
    torch.testing.assert_close(ours_logits(ours, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)
    save_llama(ours, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    torch.testing.assert_close(hf_logits(back, ids), hf_logits(hf, ids), atol=1e-4, rtol=0)


def test_dtype_preserved_or_cast(tmp_path):
    ours = Transformer(ModelConfig(vocab_size=97, n_layer=1, n_head=4, d_model=64))
    save_llama(ours, tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_llama(tmp_path).embed.weight.dtype == torch.bfloat16
    assert load_llama(tmp_path, dtype=torch.float32).blocks[0].attn.wq.weight.dtype == \
        torch.float32


def edit_config(path: Path, **changes) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, named", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope parameters"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope parameters"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0,
                          "original_max_position_embeddings": 16, "beta_fast": 16}},
     "rope parameters"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"head_dim": 32}, "head_dim"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "gpt2"}, "model_type"),
])
def test_unsupported_config_is_refused(llama_copy, changes, named):
    edit_config(llama_copy, **changes)
    with pytest.raises(ValueError, match=named):
        load_llama(llama_copy)


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.pop("model.layers.1.mlp.up_proj.weight"), "missing.*layers.1.mlp.up_proj"),
    (lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}),
     "unexpected.*q_proj.bias"),
    (lambda t: t.update({"model.norm.weight": torch.ones(32)}), "wrong shape.*model.norm"),
])
def test_tensor_mismatch_is_refused(llama_copy, edit, named):
    weights = llama_copy / "model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=named):
        load_llama(llama_copy)


def test_multi_stream_export_is_refused(tmp_path):
    model = Transformer(ModelConfig(vocab_size=16, n_layer=1, n_head=2, d_model=32, n_streams=2))
    with pytest.raises(ValueError, match="n_streams=2"):
        save_llama(model, tmp_path)


@pytest.mark.parametrize("scaling", ["linear", "ntk", "yarn"])
def test_rope_scaling_matches_hf_past_the_trained_length(tmp_path, scaling):
    """A model trained at 16 positions, extended 4x: armodal's logits at all 64 positions equal
    transformers' for the exported model (NTK-aware exports as plain RoPE at a larger theta)."""
    torch.manual_seed(9)
    ours = Transformer(ModelConfig(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                                   d_ff=128, max_seq_len=64, rope_scaling=scaling,
                                   rope_factor=4.0, rope_original_len=16, init_std=0.15)).eval()
    save_llama(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(seed=10, length=64)
    torch.testing.assert_close(hf_logits(hf, ids), ours_logits(ours, ids), atol=1e-4, rtol=0)
    again = load_llama(tmp_path)
    torch.testing.assert_close(ours_logits(again, ids), ours_logits(ours, ids), atol=1e-5,
                               rtol=0)


def test_rope_factor_one_is_no_scaling():
    torch.manual_seed(11)
    plain = Transformer(ModelConfig(vocab_size=97, n_layer=1, n_head=4, d_model=64, max_seq_len=32))
    ids = random_ids(seed=12, length=32)
    for scaling in ("linear", "ntk", "yarn"):
        scaled = Transformer(ModelConfig(vocab_size=97, n_layer=1, n_head=4, d_model=64,
                                         max_seq_len=32, rope_scaling=scaling, rope_factor=1.0))
        scaled.load_state_dict(plain.state_dict())
        assert torch.equal(ours_logits(scaled, ids), ours_logits(plain, ids)), scaling
