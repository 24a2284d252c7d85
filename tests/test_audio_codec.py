"""The audio codec: residual VQ, the causal conv codec, its losses and metrics, its artefact and
its training run."""

import json
import math

import pytest
import torch

from armodal.cli import RECIPES_DIR, compose_config
from armodal.codecs import load_codec, save_codec
from armodal.codecs.artefact import CONFIG, WEIGHTS
from armodal.codecs.audio_codec import AudioCodec
from armodal.codecs.audio_lit import AudioCodecModule, mel_distance, si_snr
from armodal.codecs.quantizers import codebook_usage
from armodal.codecs.rvq import DROPPED, ResidualVQ


@pytest.fixture(autouse=True)
def one_thread():
    # The models are tiny; on a shared 2-core machine a second thread mostly waits for a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_codec(levels=3, codebook=16, **kwargs) -> AudioCodec:
    rvq = ResidualVQ(levels, codebook, 8, **kwargs)
    return AudioCodec(rvq, sample_rate=8000, strides=(2, 4), channels=4, dilations=(1, 3))


# ------------------------------------------------------------------------------------ ResidualVQ


def fitted_rvq(levels=4, **kwargs) -> tuple[ResidualVQ, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(4, 64, 6)  # (B, T, D)
    rvq = ResidualVQ(levels, 16, 6, quantizer_dropout=False, **kwargs).train()
    for _ in range(5):
        rvq(x)
    return rvq.eval(), x


def test_rvq_more_levels_give_lower_error():
    rvq, x = fitted_rvq()
    errors = [float((rvq.decode(rvq.encode(x, n)) - x).pow(2).mean()) for n in range(1, 5)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    quantized, codes, loss = rvq(x)
    assert codes.shape == (4, 4, 64) and torch.equal(codes, rvq.encode(x))
    assert torch.allclose(quantized, rvq.decode(codes), atol=1e-5) and float(loss) > 0
    assert rvq.encode(x, 2).shape == (4, 2, 64)
    assert torch.equal(rvq.encode(x, 2), codes[:, :2])  # a prefix of the full codes


def test_rvq_straight_through_gradient_reaches_the_input():
    rvq, x = fitted_rvq()
    x = x.clone().requires_grad_()
    quantized, _, loss = rvq.train()(x)
    (quantized.sum() + loss).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_quantizer_dropout_uses_fewer_levels_in_training_only():
    torch.manual_seed(0)
    rvq = ResidualVQ(4, 16, 6, quantizer_dropout=True).train()
    x = torch.randn(64, 5, 6)
    _, codes, _ = rvq(x)
    used = (codes != DROPPED).all(-1).sum(1)  # (B,) levels each item used
    assert ((codes != DROPPED).all(-1) == (codes != DROPPED).any(-1)).all()  # whole frames
    assert used.min() == 1 and used.max() == 4 and len(used.unique()) == 4
    # Levels are used in order: an item that uses level k uses every level before it.
    assert ((codes[:, 1:] != DROPPED) <= (codes[:, :-1] != DROPPED)).all()
    _, codes, _ = rvq.eval()(x)
    assert (codes != DROPPED).all()
    assert (ResidualVQ(4, 16, 6, quantizer_dropout=True, dropout_fraction=0.0).train()(x)
            .codes != DROPPED).all()


def test_dropped_items_never_reach_a_levels_codebook_statistics(monkeypatch):
    rvq = ResidualVQ(3, 8, 4, quantizer_dropout=True, kmeans_init=False, decay=0.5,
                     dead_code_threshold=0.0).train()
    monkeypatch.setattr(rvq, "sample_levels", lambda b, d: torch.tensor([1, 3]))
    rvq(torch.randn(2, 10, 4))  # item 0 uses level 0 only; item 1 all three
    sizes = [float(level.cluster_size.sum()) for level in rvq.levels]
    # cluster_size starts at one per code and moves halfway to this batch's counts.
    assert sizes == [pytest.approx(0.5 * 8 + 0.5 * 20), pytest.approx(0.5 * 8 + 0.5 * 10),
                     pytest.approx(0.5 * 8 + 0.5 * 10)]


def test_rvq_rejects_bad_settings_and_codes():
    with pytest.raises(ValueError, match="n_levels"):
        ResidualVQ(0, 16, 4)
    rvq = ResidualVQ(2, 16, 4)
    with pytest.raises(ValueError, match=r"n_q=3"):
        rvq.encode(torch.randn(1, 3, 4), n_q=3)
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        rvq(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        rvq.decode(torch.full((1, 2, 3), 16))
    assert ResidualVQ(**rvq.config()).config() == rvq.config()


# ------------------------------------------------------------------------------------ AudioCodec


def test_codec_shapes_and_rates():
    codec = tiny_codec().eval()
    assert codec.hop == 8 and codec.frame_rate == 1000
    assert codec.bitrate() == 1000 * 3 * 4 and codec.bitrate(1) == 4000
    wave = 0.1 * torch.randn(2, 1, 61)  # not a multiple of hop: padded to 64, then trimmed
    codes = codec.encode(wave)
    assert codes.shape == (2, 3, 8) == (2, codec.n_levels, math.ceil(61 / 8))
    assert codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 16
    assert codec.decode(codes).shape == (2, 1, 64)
    assert codec.decode(codes[:, :1]).shape == (2, 1, 64)  # fewer levels, same length
    recon, forward_codes, _ = codec(wave)
    assert recon.shape == (2, 1, 61) and torch.equal(forward_codes, codes)
    assert torch.allclose(recon, codec.decode(codes)[..., :61], atol=1e-5)
    with pytest.raises(ValueError, match=r"\(B, 1, S\)"):
        codec.encode(torch.randn(2, 61))


def test_encoder_and_decoder_are_causal():
    torch.manual_seed(0)
    codec = tiny_codec(codebook=64).eval()
    wave = 0.3 * torch.randn(1, 1, 128)  # 16 frames of 8 samples
    changed = wave.clone()
    changed[..., 43:] = 0.3 * torch.randn(85)  # from inside frame 5 onwards
    z, z_changed = codec.encode_latents(wave), codec.encode_latents(changed)  # (1, 16, D)
    # Frame t ends at sample 8 (t + 1) - 1: frames 0..4 end before sample 43.
    assert torch.equal(z[:, :5], z_changed[:, :5])
    assert not torch.allclose(z[:, 5], z_changed[:, 5])
    assert torch.equal(codec.encode(wave)[..., :5], codec.encode(changed)[..., :5])
    codes = codec.encode(wave)
    other = codes.clone()
    other[..., 9:] = (other[..., 9:] + 1) % 64
    out, out_other = codec.decode(codes), codec.decode(other)
    assert torch.equal(out[..., :72], out_other[..., :72])  # samples of frames 0..8
    assert not torch.allclose(out[..., 72:], out_other[..., 72:])


def test_codec_rejects_bad_settings():
    with pytest.raises(ValueError, match="strides"):
        AudioCodec(ResidualVQ(2, 8, 4), strides=())
    with pytest.raises(ValueError, match="activation"):
        AudioCodec(ResidualVQ(2, 8, 4), activation="tanh")
    with pytest.raises(ValueError, match="n_q=3"):
        tiny_codec(levels=2).bitrate(3)


# --------------------------------------------------------------------------------------- metrics


def test_si_snr_edges():
    torch.manual_seed(0)
    t = torch.sin(torch.linspace(0, 60, 4000))[None, None].repeat(3, 1, 1)  # (3, 1, S)
    assert si_snr(t, t).tolist() == [100.0] * 3  # capped, not infinite
    scaled = t * torch.tensor([0.1, 3.0, -2.0])[:, None, None]  # gain (even negative) and
    assert (si_snr(scaled + 0.5, t) > 90).all()  # offset are not errors (fp32 inputs)
    t = t - t.mean(-1, keepdim=True)
    noise = torch.randn_like(t)
    noise = noise - noise.mean(-1, keepdim=True)
    noise = noise - (noise * t).sum(-1, keepdim=True) / t.pow(2).sum(-1, keepdim=True) * t
    for snr in (0.0, 10.0, 20.0):  # zero-mean noise orthogonal to t at a known power ratio
        scale = (t.pow(2).sum(-1, keepdim=True) / noise.pow(2).sum(-1, keepdim=True)
                 / 10 ** (snr / 10)).sqrt()
        assert si_snr(t + scale * noise, t) == pytest.approx([snr] * 3, abs=1e-3)
    with pytest.raises(ValueError, match="one shape"):
        si_snr(t, t[..., :10])


def test_mel_distance_edges():
    torch.manual_seed(0)
    t = 0.1 * torch.randn(1, 1, 8000)  # white: every mel bin above the silence floor
    assert float(mel_distance(t, t, 16000)) == 0.0
    assert float(mel_distance(t + 0.1 * torch.randn_like(t), t, 16000)) > 0.1
    louder = float(mel_distance(2 * t, t, 16000))
    assert louder == pytest.approx(math.log10(2), abs=1e-4)  # a 2x gain is log10(2) everywhere
    sine = 0.3 * torch.sin(torch.linspace(0, 2000, 8000))[None, None]
    assert 0 < float(mel_distance(2 * sine, sine, 16000)) < louder  # floored bins count 0
    assert mel_distance(torch.zeros(2, 1, 8000), torch.zeros(2, 1, 8000), 16000).shape == (2,)


# ---------------------------------------------------------------------- a short fit and artefact


def tones(n, seconds, seed=0):
    from armodal.data.audio import SyntheticTones

    return SyntheticTones(n=n, sample_rate=8000, clip_seconds=seconds, seed=seed).load().clips


@pytest.fixture(scope="module")
def fitted_codec():
    """A tiny codec fitted for 40 steps on synthetic tones: a couple of seconds."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    codec = tiny_codec(levels=3, codebook=16, dead_code_threshold=0.05)
    module = AudioCodecModule(codec, optimizer=None, fft_sizes=(128, 256), n_mels=(16, 32))
    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    clips = tones(32, 0.25)
    losses = []
    for step in range(40):
        loss, _, _, _ = module.losses(clips[torch.randint(32, (8,))])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) < sum(losses[:10])
    return codec.eval(), clips


def test_short_fit_uses_every_level_of_the_codebook(fitted_codec):
    codec, clips = fitted_codec
    codes = codec.encode(clips[:, None])  # (32, 3, 250)
    for k in range(3):
        assert codebook_usage(codes[:, k], 16)[0] >= 0.5, k


def test_saved_audio_codec_loads_frozen_with_identical_codes(fitted_codec, tmp_path):
    codec, clips = fitted_codec
    loaded, meta = load_codec(save_codec(tmp_path / "codec", codec, {"metrics": {"x": 1.0}}))
    assert isinstance(loaded, AudioCodec) and not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    assert meta["kind"] == "armodal.audio_codec" and meta["quantizer"]["kind"] == "rvq"
    assert (meta["sample_rate"], meta["hop"], meta["n_levels"], meta["codebook_size"],
            meta["frame_rate"], meta["metrics"]) == (8000, 8, 3, 16, 1000.0, {"x": 1.0})
    wave = clips[:4, None]
    assert torch.equal(loaded.encode(wave), codec.encode(wave))
    assert torch.equal(loaded.decode(loaded.encode(wave)), codec.decode(codec.encode(wave)))
    assert torch.equal(loaded.encode(wave, n_q=2), codec.encode(wave, n_q=2))


def test_tampered_or_foreign_audio_codec_is_refused(fitted_codec, tmp_path):
    codec, _ = fitted_codec
    directory = save_codec(tmp_path / "codec", codec)
    weights = directory / WEIGHTS
    damaged = bytearray(weights.read_bytes())
    damaged[-1] ^= 0xFF
    weights.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="sha256"):
        load_codec(directory)
    directory = save_codec(tmp_path / "codec", codec)
    meta = json.loads((directory / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**meta, "kind": "some.other.codec"}))
    with pytest.raises(ValueError, match="not an armodal codec"):
        load_codec(directory)
    (directory / CONFIG).write_text(json.dumps({**meta, "kind": "armodal.vqvae"}))
    with pytest.raises(ValueError, match="does not describe"):  # audio weights, image kind
        load_codec(directory)
    with pytest.raises(ValueError, match="cannot save"):
        save_codec(tmp_path / "x", torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- recipe, end to end


def quick_audio_overrides(tmp_path, steps=3):
    return [f"run_dir={tmp_path}", f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
            "trainer.enable_model_summary=false", "callbacks={}",
            "~data.audio.n_utterances", "~data.audio.clip_seconds",
            "data.audio._target_=armodal.data.audio.SyntheticTones", "+data.audio.n=20",
            "+data.audio.clip_seconds=0.25", "data.audio.sample_rate=8000",
            "data.batch_size=4", "data.segment_seconds=0.1",
            "model.strides=[2,4]", "model.channels=4", "model.dilations=[1]",
            "model.quantizer.n_levels=2", "model.quantizer.codebook_size=16",
            "model.quantizer.dim=8", "loss.fft_sizes=[128]", "loss.n_mels=[16]",
            "optim.scheduler.warmup_steps=1"]


def test_audio_codec_recipe_runs_end_to_end(tmp_path, capsys, monkeypatch):
    from armodal.train import train

    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config(RECIPES_DIR, "audio_codec", []).task == "audio_codec"
    cfg = compose_config(RECIPES_DIR, "audio_codec", quick_audio_overrides(tmp_path / "run"))
    result = train(cfg)  # dispatched on task: audio_codec
    assert result.steps == 3 and result.codec_dir == tmp_path / "run" / "codec"
    m = result.metrics
    assert m["val/bitrate"] == 1000 * 2 * 4 and math.isfinite(m["val/si_snr"])
    assert {"val/usage_level0", "val/usage_level1", "val/perplexity_level1", "val/loss",
            "val/mel_distance"} <= set(m)
    loaded, meta = load_codec(result.codec_dir)
    assert meta["val_clips"] == 2 and meta["metrics"] == m and meta["steps"] == 3
    assert "domain.tokenizer.codec=" in capsys.readouterr().out
