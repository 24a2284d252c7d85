"""Conditioning on embeddings: prefix positions through the transformer, generation with them,
and the prefix-captioning task end to end."""

from __future__ import annotations

import json

import pytest
import torch

from armodal.cli import RECIPES_DIR, compose_config, main
from armodal.generation import DecodingConfig, generate
from armodal.model import ModelConfig, Transformer
from armodal.prefix import ImagePrefix, PrefixedModel


def tiny(vocab: int = 40, seq: int = 32) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, d_model=32,
                                   max_seq_len=seq)).eval()


def test_prefix_embeddings_take_positions_but_get_no_logits():
    model = tiny()
    prefix = torch.randn(2, 5, 32)
    idx = torch.randint(0, 40, (2, 7))
    logits = model(idx, prefix=prefix)
    assert logits.shape == (2, 7, 40)
    # The prefix changes what the tokens see ...
    assert not torch.allclose(logits, model(idx))
    # ... and fed through a cache in pieces it gives the same logits as in one forward.
    cache = model.new_cache(2, 12)
    first = model(idx[:, :3], cache, prefix=prefix)
    rest = torch.cat([model(idx[:, t:t + 1], cache) for t in range(3, 7)], dim=1)
    torch.testing.assert_close(torch.cat([first, rest], 1), logits, atol=1e-5, rtol=1e-5)


def test_generation_with_a_prefix_is_the_same_cached_and_uncached():
    model = tiny()
    prefix = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1)) * 20
    wrapped = PrefixedModel(model, prefix)
    assert wrapped.config.max_seq_len == 28
    prompts = [[1, 2]] * 3
    outputs = {}
    for strategy in ("greedy", "sample"):
        config = DecodingConfig(strategy=strategy, max_new_tokens=10, seed=5)
        cached = outputs[strategy] = generate(wrapped, prompts, config)
        plain = generate(wrapped, prompts, DecodingConfig(strategy=strategy, max_new_tokens=10,
                                                           seed=5, use_cache=False))
        assert cached.sequences == plain.sequences
    # Different prefixes, different continuations (the prefix is really read).
    assert len({tuple(s) for s in outputs["greedy"].sequences}) > 1
    with pytest.raises(ValueError, match="classifier-free guidance is not supported"):
        generate(wrapped, prompts, DecodingConfig(cfg_scale=2.0, max_new_tokens=2),
                 uncond_prompts=prompts)


def test_the_conv_encoder_trains_and_a_codec_encoder_needs_its_codec():
    enc = ImagePrefix(32, kind="conv", image_size=(8, 8))
    out = enc(torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8))
    assert out.shape == (3, enc.n_positions, 32) and enc.n_positions == 4
    assert all(p.requires_grad for p in enc.parameters())
    with pytest.raises(ValueError, match="kind=codec needs codec="):
        ImagePrefix(32, kind="codec")
    with pytest.raises(ValueError, match="allowed: codec, conv"):
        ImagePrefix(32, kind="clip")


def test_prefix_captioning_trains_and_evaluates_end_to_end(tmp_path, capsys):
    from armodal.train import train

    cfg = compose_config(RECIPES_DIR, "multimodal_digits_prefix", [
        "domain.source.images={_target_:armodal.data.images.DigitsImages}",
        "domain.encoder.kind=conv", "+domain.source.val_fraction=0.1",
        "+domain.source.split=random", "model=tiny", "trainer.max_steps=8",
        "trainer.val_check_interval=8", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "domain.data.batch_size=16",
        "optim.scheduler.warmup_steps=2", f"run_dir={tmp_path / 'run'}"])
    result = train(cfg)
    assert 0 <= result.metrics["val/caption_accuracy"] <= 1
    # Checkpoints for resume=auto, and the loss curve, as every run writes them.
    assert (result.run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (result.run_dir / "loss_curve.png").is_file()
    capsys.readouterr()
    main(["eval", f"run={result.run_dir}"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["captioned_images"] == 180 and out["encoder"] == "conv"
    assert out["image_to_text_accuracy"] == pytest.approx(result.metrics["val/caption_accuracy"])
