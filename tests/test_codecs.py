"""Codecs: VQ / FSQ quantizers, the image VQ-VAE, its training run and its saved artefact."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import open_dict

from armodal.cli import CONF_DIR, RECIPES_DIR, compose_config
from armodal.codecs import (
    FSQ,
    VQVAE,
    VectorQuantizer,
    codebook_usage,
    load_codec,
    save_codec,
    usage_from_counts,
)
from armodal.codecs.artefact import CONFIG, WEIGHTS
from armodal.codecs.lit import image_psnr
from armodal.codecs.vqvae import to_uint8, to_unit

# ----------------------------------------------------------------------------- VectorQuantizer


def brute_force_nearest(z, codebook):
    return torch.stack([((codebook - v) ** 2).sum(-1).argmin() for v in z])


@pytest.mark.parametrize("l2", [False, True])
def test_vq_lookup_is_the_brute_force_nearest_code(l2):
    torch.manual_seed(0)
    vq = VectorQuantizer(37, 6, l2_normalize=l2, kmeans_init=False).eval()
    x = torch.randn(3, 11, 6)
    out = vq(x)
    z = F.normalize(x, dim=-1) if l2 else x
    expected = brute_force_nearest(z.reshape(-1, 6), vq.codebook_vectors()).reshape(3, 11)
    assert out.codes.dtype == torch.int64 and out.codes.shape == (3, 11)
    assert torch.equal(out.codes, expected)
    assert torch.equal(vq.encode(x), expected)
    # Forward value is exactly the code vector; decode is the same lookup.
    assert torch.allclose(out.quantized, vq.codebook_vectors()[expected], atol=1e-6)
    assert torch.allclose(vq.decode(expected), out.quantized, atol=1e-6)


@pytest.mark.parametrize("ema", [True, False])
def test_vq_straight_through_gradient_reaches_the_encoder(ema):
    torch.manual_seed(0)
    encoder = torch.nn.Linear(4, 8)
    vq = VectorQuantizer(16, 8, ema=ema, code_dim=3, kmeans_init=False)
    out = vq(encoder(torch.randn(10, 4)))
    (out.quantized.pow(2).sum() + out.loss).backward()
    assert encoder.weight.grad is not None and encoder.weight.grad.abs().sum() > 0
    assert vq.project_in.weight.grad.abs().sum() > 0
    if not ema:  # the learned codebook gets the codebook loss's gradient
        assert vq.codebook.grad.abs().sum() > 0
    else:
        assert not vq.codebook.requires_grad


def test_vq_ema_moves_codes_towards_their_assigned_means():
    torch.manual_seed(0)
    vq = VectorQuantizer(2, 2, kmeans_init=False, decay=0.5, dead_code_threshold=0.0)
    vq.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    vq.embed_sum.copy_(vq.codebook)
    x = torch.tensor([[1.0, 1.0], [1.0, 1.0], [9.0, 9.0]])  # means (1, 1) and (9, 9)
    vq.train()
    for _ in range(30):
        vq(x)
    assert torch.allclose(vq.codebook, torch.tensor([[1.0, 1.0], [9.0, 9.0]]), atol=1e-3)
    assert torch.allclose(vq.cluster_size, torch.tensor([2.0, 1.0]), atol=1e-3)


def test_vq_eval_mode_never_changes_the_codebook():
    vq = VectorQuantizer(8, 4).eval()
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    vq(torch.randn(50, 4))
    vq.encode(torch.randn(50, 4))
    assert all(torch.equal(before[k], v) for k, v in vq.state_dict().items())
    assert not bool(vq.initialized)  # k-means waits for the first training batch


def test_vq_kmeans_initialises_once_and_survives_a_reload():
    torch.manual_seed(0)
    centres = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [0.0, 5.0], [0.0, -5.0]])
    x = (centres[:, None] + 0.1 * torch.randn(4, 100, 2)).reshape(-1, 2)
    vq = VectorQuantizer(4, 2, kmeans_iters=20, dead_code_threshold=0.0).train()
    vq(x)
    assert bool(vq.initialized)
    found = sorted(vq.codebook.tolist())
    assert torch.allclose(torch.tensor(found), torch.tensor(sorted(centres.tolist())), atol=0.1)
    vq(x + 100)  # a later batch far away: no re-initialisation, only a slow EMA step
    assert vq.codebook.abs().max() < 10
    fresh = VectorQuantizer(4, 2).train()
    fresh.load_state_dict(vq.state_dict())
    saved = fresh.codebook.clone()
    fresh.decay = 1 - 1e-9  # freeze the EMA so any change would be a re-initialisation
    fresh(x * 3)
    assert torch.allclose(fresh.codebook, saved, atol=1e-4)


def test_vq_dead_codes_restart_onto_batch_vectors():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, kmeans_init=False, decay=0.5, dead_code_threshold=1.0)
    vq.codebook.copy_(torch.full((8, 2), 1000.0))  # far from all data: every code unused
    vq.codebook[0] = 0.0
    vq.embed_sum.copy_(vq.codebook)
    x = torch.randn(64, 2)
    vq.train()(x)
    restarted = vq.codebook[1:]
    assert (restarted.abs() < 100).all()  # moved from 1000 onto the data
    assert all(((x - row).abs().sum(-1) < 1e-6).any() for row in restarted)
    for _ in range(20):
        vq(x)
    used, _ = codebook_usage(vq.eval().encode(x), 8)
    assert used >= 0.75


def test_vq_l2_mode_has_unit_norm_codes_in_a_low_dimensional_space():
    vq = VectorQuantizer(32, 16, code_dim=4, l2_normalize=True, ema=False).train()
    vq(torch.randn(200, 16))
    codes = vq.codebook_vectors()
    assert codes.shape == (32, 4)
    assert torch.allclose(codes.norm(dim=-1), torch.ones(32), atol=1e-5)
    assert vq.decode(torch.tensor([0, 5])).shape == (2, 16)  # projected back up


@pytest.mark.parametrize("kwargs", [
    {"codebook_size": 1, "dim": 4}, {"codebook_size": 8, "dim": 4, "code_dim": 5},
    {"codebook_size": 8, "dim": 4, "decay": 1.0}, {"codebook_size": 8, "dim": 4,
                                                   "dead_code_threshold": -1.0}])
def test_vq_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        VectorQuantizer(**kwargs)


def test_vq_rejects_bad_inputs_and_codes():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match=r"\(\.\.\., 4\)"):
        vq(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        vq.decode(torch.tensor([8]))


# ----------------------------------------------------------------------------------------- FSQ


def test_fsq_codes_in_range_and_round_trip():
    torch.manual_seed(0)
    fsq = FSQ([8, 5, 5, 5], dim=12)
    assert fsq.codebook_size == 1000
    x = 3 * torch.randn(4, 6, 12)
    out = fsq(x)
    assert out.codes.shape == (4, 6) and out.codes.dtype == torch.int64
    assert out.codes.min() >= 0 and out.codes.max() < 1000 and float(out.loss) == 0
    assert torch.equal(fsq.encode(x), out.codes)
    assert torch.allclose(fsq.decode(out.codes), out.quantized, atol=1e-6)
    grid = fsq.grid_values(torch.arange(1000))  # (1000, 4): every grid point, each once
    assert grid.unique(dim=0).shape[0] == 1000 and grid.abs().max() <= 1


def test_fsq_reaches_every_level_and_passes_gradients():
    fsq = FSQ([4, 3])  # no projection: the input dims are the FSQ dims
    sweep = torch.linspace(-10, 10, 2001)
    x = torch.stack([sweep, sweep], -1).requires_grad_()
    out = fsq(x)
    assert set((out.codes % 4).tolist()) == {0, 1, 2, 3}  # every level of each dimension
    assert set((out.codes // 4).tolist()) == {0, 1, 2}
    assert codebook_usage(fsq.encode(torch.randn(5000, 2) * 3), 12)[0] == 1.0
    out.quantized.sum().backward()
    assert x.grad.abs().sum() > 0


def test_fsq_rejects_bad_levels():
    with pytest.raises(ValueError, match="levels"):
        FSQ([8, 1])


def test_codebook_usage_and_perplexity():
    assert codebook_usage(torch.arange(8).repeat(3), 8) == (1.0, pytest.approx(8.0))
    used, ppl = codebook_usage(torch.zeros(10, dtype=torch.long), 4)
    assert used == 0.25 and ppl == pytest.approx(1.0)
    assert usage_from_counts(torch.tensor([1.0, 1.0, 0.0, 0.0])) == (0.5, pytest.approx(2.0))
    with pytest.raises(ValueError):
        codebook_usage(torch.tensor([4]), 4)


# --------------------------------------------------------------------------------------- VQVAE


@pytest.mark.parametrize("channels,size,quantizer", [
    (1, (28, 28), VectorQuantizer(64, 16)), (3, (32, 16), FSQ([5, 5], dim=16))])
def test_vqvae_round_trip_keeps_shapes(channels, size, quantizer):
    model = VQVAE(quantizer, in_channels=channels, downsample=4, hidden=16, res_blocks=1).eval()
    images = torch.randint(0, 256, (2, channels, *size), dtype=torch.uint8)
    codes = model.encode(images)
    assert codes.shape == (2, size[0] // 4, size[1] // 4) == (2, *model.grid(*size))
    assert codes.min() >= 0 and codes.max() < model.codebook_size
    out = model.decode(codes)
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(model.encode(images[0]), codes[0])  # one (C, H, W) image
    assert torch.equal(model.decode(codes[1]), out[1])


def test_vqvae_rejects_bad_shapes_and_settings():
    model = VQVAE(VectorQuantizer(8, 4), in_channels=1, downsample=4, hidden=8)
    with pytest.raises(ValueError, match="multiple of downsample=4"):
        model.encode(torch.zeros(1, 1, 30, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        model.encode(torch.zeros(1, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        model.encode(torch.zeros(1, 1, 28, 28))
    with pytest.raises(ValueError, match="power of two"):
        VQVAE(VectorQuantizer(8, 4), downsample=6)
    with pytest.raises(ValueError, match="in_channels"):
        VQVAE(VectorQuantizer(8, 4), in_channels=2)


def test_psnr_of_uint8_images():
    a = torch.zeros(2, 1, 4, 4, dtype=torch.uint8)
    b = a.clone()
    b[0] = 255  # MSE 255^2 -> 0 dB; the identical image is capped, not infinite
    assert image_psnr(b, a).tolist() == [pytest.approx(0.0), pytest.approx(100.0)]
    assert torch.equal(to_uint8(to_unit(torch.arange(256, dtype=torch.uint8))),
                       torch.arange(256, dtype=torch.uint8))


# ------------------------------------------------------------------ training run and artefact


def quick_codec_overrides(tmp_path, steps=150):
    return [f"run_dir={tmp_path}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "callbacks={}",
            "data.images._target_=armodal.data.images.DigitsImages", "+data.images.size=16",
            "data.augment=null", "data.batch_size=64",
            "model.hidden=16", "model.res_blocks=1", "model.downsample=2",
            "model.quantizer.codebook_size=32", "model.quantizer.dim=16",
            "optim.scheduler.warmup_steps=10", "optim.optimizer.lr=3e-3"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A short VQ-VAE fit on sklearn digits (16x16 -> 8x8 codes of 32): seconds on 2 cores."""
    from armodal.codecs.train import train_codec

    tmp = tmp_path_factory.mktemp("codec_run")
    cfg = compose_config(CONF_DIR, "train_codec", quick_codec_overrides(tmp / "run"))
    # One thread: the model is tiny, and on a shared 2-core machine a second worker thread
    # spin-waits for a busy core and makes the run several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_codec(cfg)
    finally:
        torch.set_num_threads(threads)


def test_short_fit_uses_the_codebook_and_beats_the_mean_image(digits_run):
    from armodal.data.images import DigitsImages, split_images

    m = digits_run.metrics
    assert digits_run.steps == 150 and digits_run.grid == (8, 8)
    assert m["val/code_usage"] >= 0.5, m
    _, val = split_images(DigitsImages(size=16).load(), 0.1, seed=1337)
    mean_image = val.images.float().mean(0, keepdim=True).round().to(torch.uint8)
    baseline = image_psnr(mean_image.expand_as(val.images).contiguous(), val.images).mean()
    assert m["val/psnr"] > float(baseline) + 3, (m, float(baseline))
    assert 1 <= m["val/code_perplexity"] <= 32 and math.isfinite(m["val/psnr"])


def test_saved_codec_loads_frozen_and_gives_identical_codes(digits_run, tmp_path):
    model = digits_run.module.model.eval()
    loaded, meta = load_codec(digits_run.codec_dir)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert meta["grid"] == [8, 8] and meta["image_size"] == [16, 16]
    assert meta["quantizer"]["kind"] == "vq" and meta["metrics"]["val/psnr"] > 0
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(loaded.encode(images), model.encode(images))
    assert torch.equal(loaded.decode(loaded.encode(images)), model.decode(model.encode(images)))
    fsq_model = VQVAE(FSQ([4, 4], dim=8), in_channels=3, downsample=2, hidden=8)
    fsq_loaded, _ = load_codec(save_codec(tmp_path / "fsq", fsq_model, {"note": "x"}))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(fsq_loaded.encode(images), fsq_model.eval().encode(images))


def test_damaged_or_missing_codec_gives_a_clear_error(tmp_path):
    model = VQVAE(VectorQuantizer(8, 4), in_channels=1, downsample=2, hidden=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_codec(tmp_path / "nowhere")
    codec = save_codec(tmp_path / "codec", model)
    weights = codec / WEIGHTS
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF  # one flipped byte in the last weight
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        load_codec(codec)
    codec = save_codec(tmp_path / "codec", model)
    (codec / CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_codec(codec)
    (codec / CONFIG).write_text(json.dumps({"kind": "other"}))
    with pytest.raises(ValueError, match="not an armodal codec"):
        load_codec(codec)
    (codec / CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG):
        load_codec(codec)


# ----------------------------------------------------------------------------------- configs


def instantiate_codec_config(cfg, tmp_path):
    """Build every leaf train_codec builds (no data loading, no training)."""
    with open_dict(cfg):
        cfg.run_dir = str(tmp_path)
    assert cfg.task == "codec"
    instantiate(cfg.data.images)
    if cfg.data.augment is not None:
        instantiate(cfg.data.augment)
    model = instantiate(cfg.model, in_channels=1)
    assert isinstance(model, VQVAE) and model.codebook_size >= 2
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(2, 2))])
    instantiate(cfg.optim.scheduler)(optimizer, total_steps=10)
    for logger in cfg.logger.values():
        instantiate(logger)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    instantiate(cfg.trainer, callbacks=callbacks, logger=False)
    return model


@pytest.mark.parametrize("codec", sorted(p.stem for p in (CONF_DIR / "codec").glob("*.yaml")))
def test_every_quantizer_choice_composes_and_instantiates(codec, tmp_path):
    cfg = compose_config(CONF_DIR, "train_codec", [f"codec={codec}"])
    model = instantiate_codec_config(cfg, tmp_path)
    assert model.codebook_size == 512
    assert isinstance(model.quantizer, FSQ if codec == "fsq" else VectorQuantizer)


def test_image_vq_tokenizer_recipe_composes_and_instantiates(tmp_path):
    cfg = compose_config(RECIPES_DIR, "image_vq_tokenizer", [f"data.images.root={tmp_path}"])
    assert cfg.name == "image_vq_tokenizer" and cfg.data.split == "tail"
    model = instantiate_codec_config(cfg, tmp_path)
    assert model.grid(28, 28) == (7, 7)
