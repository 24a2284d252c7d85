"""Hydra composition of every recipe and axis combination, train(cfg), export and reload."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from armodal.checkpoint import load_run
from armodal.cli import CONF_DIR, RECIPES_DIR, available_recipes, compose_config
from armodal.data.audio import SyntheticTones
from armodal.generation import DecodingConfig, generate
from armodal.model import ModelConfig, Transformer

REQUIRED = {"text_char": ["domain.source.path=README.md"],
            "text_byte": ["domain.source.path=README.md"],
            "image_mnist": ["domain.images.root=/nonexistent/mnist"],
            "image_folder": ["domain.images.root=/nonexistent/folder"],
            "image_mnist_vq": ["domain.images.root=/nonexistent/mnist"],
            "video_moving_digits": ["domain.video.images.root=/nonexistent/mnist"],
            "actions_folder": ["domain.episodes.root=/nonexistent/episodes"],
            "multimodal_digits_captions": ["domain.images.root=/nonexistent/mnist"],
            "digits_prefix_captions": ["domain.images.root=/nonexistent/mnist"]}


@pytest.fixture
def required(tiny_codec, tiny_audio_codec):
    """The overrides a domain needs to compose: its data path, and a codec for VQ domains."""
    def overrides(domain: str) -> list[str]:
        vq = domain.endswith("_vq") or domain.startswith("video_")
        codec = [f"domain.tokenizer.codec={tiny_codec}"] if vq else \
            [f"domain.tokenizer.codec={tiny_audio_codec}"] if domain.endswith("_codes") else []
        codec += {"multimodal_digits_captions":
                  [f"domain.tokenizer.tokenizers.image.codec={tiny_codec}"],
                  "multimodal_speech_text":
                  [f"domain.tokenizer.tokenizers.audio.codec={tiny_audio_codec}"]}.get(domain, [])
        return REQUIRED.get(domain, []) + codec
    return overrides


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def instantiate_all(cfg, tmp_path: Path) -> None:
    """Build every leaf a run builds, except the (possibly huge) model weights."""
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    tokenizer = instantiate(cfg.domain.tokenizer)
    model_config = instantiate(cfg.model, vocab_size=300)
    assert isinstance(model_config, ModelConfig)
    if tokenizer.modality == "multimodal":
        instantiate(cfg.domain.mixture, _convert_="object")  # lazily, as the sources are
    elif "encoder" in cfg.domain:  # prefix captioning: a caption source, images as embeddings
        instantiate(cfg.domain.source, _convert_="object")
    elif "video" in cfg.domain:
        instantiate(cfg.domain.video)  # lazily: the images are read at load()
    elif tokenizer.modality == "image":
        instantiate(cfg.domain.images)  # lazily: the data need not exist to compose
    elif tokenizer.modality == "audio":
        instantiate(cfg.domain.audio)  # lazily: a speech corpus is built at load()
    elif tokenizer.modality == "action":
        instantiate(cfg.domain.episodes)  # lazily: rollouts are played at load()
    else:
        assert tokenizer.modality == "text"
        instantiate(cfg.domain.source)
        assert model_config.max_seq_len == cfg.domain.data.seq_len
    assert isinstance(instantiate(cfg.decoding), DecodingConfig)
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    instantiate(cfg.optim.scheduler)(optimizer, total_steps=10)
    for logger in cfg.logger.values():
        instantiate(logger)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    if cfg.trainer.accelerator == "cpu":
        instantiate(cfg.trainer, callbacks=callbacks, logger=False)


def test_recipes_exist():
    assert {"text_code_cpu", "text_char_shakespeare"} <= set(available_recipes())


def lm_recipes() -> list[str]:
    """Recipes that train a language model from scratch (codec recipes are composed in
    test_codecs, sequence-level fine-tuning in test_reinforce)."""
    return [r for r in available_recipes()
            if compose_config(RECIPES_DIR, r, []).get("task") is None]


@pytest.mark.parametrize("recipe", lm_recipes())
def test_every_recipe_composes_and_instantiates(recipe, tmp_path, monkeypatch, required):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    domain = compose_config(RECIPES_DIR, recipe, []).domain.name
    cfg = compose_config(RECIPES_DIR, recipe, required(domain))
    assert cfg.name == recipe
    instantiate_all(cfg, tmp_path)


@pytest.mark.parametrize("domain,model,decoding", list(itertools.product(
    options("domain"), options("model"), options("decoding"))))
def test_every_axis_combination_composes(domain, model, decoding, tmp_path, required):
    cfg = compose_config(CONF_DIR, "train", [f"domain={domain}", f"model={model}",
                                             f"decoding={decoding}", *required(domain)])
    instantiate_all(cfg, tmp_path)


@pytest.mark.parametrize("model", ["tiny", "small"])
def test_cpu_presets_build(model):
    cfg = compose_config(CONF_DIR, "train", [f"model={model}"])
    net = Transformer(instantiate(cfg.model, vocab_size=4096))
    assert net.num_params() < 5_000_000


def test_base_preset_is_about_100m_parameters():
    cfg = compose_config(CONF_DIR, "train", ["model=base"])
    with torch.device("meta"):  # count without allocating
        net = Transformer(instantiate(cfg.model, vocab_size=16384))
    assert 80e6 < net.num_params() < 130e6


def test_loss_falls_and_run_dir_is_complete(char_run):
    curve = next(c for c in char_run.trainer.callbacks if type(c).__name__ == "LossCurve")
    losses = [loss for _, loss in curve.train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert char_run.final_val_loss < 3.5
    run_dir = char_run.run_dir
    for name in ("model.safetensors", "config.json", "loss_curve.png", "samples.txt",
                 "train_config.yaml"):
        assert (run_dir / name).is_file(), name
    meta = json.loads((run_dir / "config.json").read_text())
    assert meta["tokenizer"]["target"].endswith("CharTokenizer")
    assert meta["metrics"]["best_val_loss"] == pytest.approx(char_run.best_val_loss)


def test_exported_run_generates_the_same_tokens(char_run):
    run = load_run(char_run.run_dir)
    model = char_run.module.model.eval()
    prompt = [[run.space.bos_id] + run.space.to_global("text", run.tokenizer.encode("def ")).tolist()]
    config = DecodingConfig(strategy="greedy", max_new_tokens=20)
    assert generate(run.model, prompt, config).sequences == generate(model, prompt, config).sequences
    idx = torch.tensor(prompt)
    torch.testing.assert_close(run.model(idx), model(idx), atol=0, rtol=0)


def test_bpe_code_recipe_trains(tmp_path, quick_overrides):
    from armodal.train import train

    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [
        *quick_overrides(tmp_path, steps=30), "domain.source.max_bytes=300000",
        "domain.tokenizer.vocab_size=512", "domain.data.val_fraction=0.2"])
    result = train(cfg)
    curve = next(c for c in result.trainer.callbacks if type(c).__name__ == "LossCurve")
    losses = [loss for _, loss in curve.train]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    # BPE packs several bytes into a token, so bits per byte < bits per token.
    bits_per_byte = result.metrics["val/bits_per_byte"]
    assert bits_per_byte < result.final_val_loss / 0.6931 / 1.5
    assert load_run(result.run_dir).tokenizer.vocab_size == 512


def test_failed_run_leaves_no_finished_run_dir(tmp_path, quick_overrides):
    from armodal.train import train

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare",
                         [f"domain.source.path={empty}", *quick_overrides(tmp_path)])
    with pytest.raises(ValueError, match="empty"):
        train(cfg)
    assert not (tmp_path / "run" / "config.json").exists()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_run(tmp_path / "run")


@pytest.mark.parametrize("domain", options("domain"))
def test_every_configured_tokenizer_passes_conformance(domain, corpus_file, required, tmp_path):
    """The conformance check, not a registry, admits a tokenizer: run it on each one conf/ names."""
    from armodal.tokenizers import check_tokenizer

    cfg = compose_config(CONF_DIR, "train", [f"domain={domain}", *required(domain)])
    tokenizer = instantiate(cfg.domain.tokenizer)
    if tokenizer.modality == "multimodal":
        sample = [("text", "a handwritten seven")]
        for modality, part in tokenizer.parts.items():
            if modality == "image":
                c, (h, w) = part.channels, part.image_size
                sample.append(("image", torch.randint(0, 256, (c, h, w), dtype=torch.uint8)))
            elif modality == "audio":
                sample.append(("audio", SyntheticTones(n=1, sample_rate=part.sample_rate,
                                                       clip_seconds=0.05).load().clips[0]))
        check_tokenizer(tokenizer, [sample, sample[1:]])
        return
    if tokenizer.modality == "image":
        c, (h, w) = tokenizer.channels, tokenizer.image_size
        images = torch.randint(0, 256, (3, c, h, w), generator=torch.Generator().manual_seed(0),
                               dtype=torch.uint8)
        if hasattr(tokenizer, "fit"):
            tokenizer.fit(images)
        check_tokenizer(tokenizer, list(images))
        return
    if tokenizer.modality == "audio":
        waves = SyntheticTones(n=2, sample_rate=tokenizer.sample_rate, clip_seconds=0.05).load()
        check_tokenizer(tokenizer, [*waves.clips, 0.5 * torch.ones(37)])
        return
    if tokenizer.modality == "action":
        from armodal.control.rollout import Rollouts

        env_id = cfg.domain.episodes.get("env_id", "Pendulum-v1")  # a folder: continuous
        episodes = Rollouts(env_id, n_episodes=4, cache_dir=str(tmp_path)).load()
        tokenizer.fit(episodes)
        check_tokenizer(tokenizer, episodes[:2])
        return
    text = corpus_file.read_text()[:60_000]
    if hasattr(tokenizer, "fit"):
        tokenizer.fit([text])
    check_tokenizer(tokenizer, [text[:2000], text[30_000:31_000], "def f(x):\n    return x\n"])


def test_bf16_autocast_and_wandb_offline(tmp_path, quick_overrides, corpus_file, monkeypatch):
    """bf16-mixed on CPU trains; logger=wandb without an account runs offline, no network."""
    from armodal.train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={corpus_file}", *quick_overrides(tmp_path, steps=10),
        "trainer.precision=bf16-mixed", "logger=wandb"])
    result = train(cfg)
    assert torch.isfinite(torch.tensor(result.final_val_loss))
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "wandb did not run offline"


@pytest.mark.slow
def test_compiled_training_forward_equals_eager(corpus_file):
    """compile=true wraps the same parameters; compiled logits equal eager ones."""
    from armodal.lit import ARModule

    config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, max_seq_len=32)
    module = ARModule(config, optimizer=torch.optim.AdamW, compile=True)
    idx = torch.randint(0, 50, (2, 32))
    torch.testing.assert_close(module(idx), module.model(idx), atol=1e-5, rtol=1e-5)


def test_resume_from_lightning_checkpoint(tmp_path, quick_overrides, corpus_file):
    from armodal.train import train

    first = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={corpus_file}", *quick_overrides(tmp_path / "a", steps=10)])
    last = train(first).run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    resumed = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={corpus_file}", *quick_overrides(tmp_path / "b", steps=10),
        "trainer.max_steps=16", f"resume={last}"])
    result = train(resumed)
    assert result.steps == 16  # continued from step 10, not from scratch
    missing = compose_config(RECIPES_DIR, "text_char_shakespeare", [
        f"domain.source.path={corpus_file}", *quick_overrides(tmp_path / "c"),
        f"resume={tmp_path}/nope.ckpt"])
    with pytest.raises(ValueError, match="^resume=.*nope.ckpt'.*expected auto"):
        train(missing)  # refused by the config checks, before any data work


def test_module_state_dict_holds_each_weight_once():
    from armodal.lit import ARModule

    module = ARModule(ModelConfig(vocab_size=10, n_layer=1, n_head=2, d_model=8),
                      optimizer=torch.optim.AdamW)
    assert set(module.state_dict()) == {f"model.{k}" for k in module.model.state_dict()}
