"""The audio domain end to end: train, evaluate exactly, generate WAV + PNG, from the CLI too."""

import math

import pytest
import soundfile as sf
import torch
from omegaconf import open_dict

from armodal.audiogen import generate_audio, sample_audio
from armodal.checkpoint import load_run
from armodal.cli import CONF_DIR, compose_config, main
from armodal.data.audio_module import AudioLayout
from armodal.evaluate import evaluate
from armodal.generation import DecodingConfig
from armodal.train import train


def quick(tmp, domain="audio_tones", steps=20, extra=()):
    return compose_config(CONF_DIR, "train", [
        f"domain={domain}", "model=tiny", f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "optim.scheduler.warmup_steps=5",
        f"run_dir={tmp / 'run'}", *extra])


@pytest.fixture(scope="module")
def mulaw_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mulaw")
    return train(quick(tmp, extra=["domain.data.seq_len=64", "model.sliding_window=64"]))


def test_mulaw_run_learns_and_writes_samples(mulaw_run):
    bits = mulaw_run.metrics["val/bits_per_sample"]
    assert bits < 8.0  # below uniform over 256 levels after 20 steps
    wavs = sorted((mulaw_run.run_dir / "samples").glob("step_*.wav"))
    assert len(wavs) == 2 and all(w.with_suffix(".png").is_file() for w in wavs)
    data, rate = sf.read(str(wavs[0]))
    assert rate == 8000 and len(data) == 2000  # a quarter second, past the 64-sample context


def test_eval_gives_the_training_figure_exactly(mulaw_run):
    result = evaluate(str(mulaw_run.run_dir))
    assert result.unit == "sample"
    assert math.isclose(result.bits_per_unit, mulaw_run.metrics["val/bits_per_sample"],
                        rel_tol=1e-5)


def test_generation_is_batch_independent_and_continues_prompts(mulaw_run):
    run = load_run(mulaw_run.run_dir)
    layout = AudioLayout.for_run(run.space, run.meta, run.tokenizer)
    decoding = DecodingConfig(seed=3)
    prompts = torch.sin(torch.arange(2 * 40).reshape(2, 40) / 3.0) * 0.5
    both = sample_audio(run.model, run.tokenizer, layout, 2, 0.01, decoding, prompts)
    assert both.shape == (2, 80)
    # The output starts with the prompt as the tokenizer hears it (mu-law rounding).
    heard = run.tokenizer.decode(run.tokenizer.encode_batch(prompts))
    assert torch.equal(both[:, :40], heard)
    one = sample_audio(run.model, run.tokenizer, layout, 1, 0.01, decoding, prompts[:1])
    assert torch.equal(one[0], both[0])
    with pytest.raises(ValueError, match="not fewer than"):
        sample_audio(run.model, run.tokenizer, layout, 2, 0.004, decoding, prompts)


def test_generate_audio_files_and_cli(mulaw_run, tmp_path, capsys):
    run = load_run(mulaw_run.run_dir)
    paths = generate_audio(run, DecodingConfig(seed=0), num_samples=2, seconds=0.02,
                           prompt="val", prompt_seconds=0.005, out=str(tmp_path / "g"),
                           progress=False)
    assert [p.name for p in paths] == ["continuation_0.wav", "continuation_1.wav"]
    assert (tmp_path / "g" / "prompt_1.wav").is_file() and paths[1].with_suffix(".png").is_file()
    assert sf.info(str(paths[0])).frames == 160
    main(["generate", f"run={mulaw_run.run_dir}", "audio.num_samples=1", "audio.seconds=0.01",
          f"audio.out={tmp_path / 'cli'}"])
    assert "sample_0.wav" in capsys.readouterr().out
    assert sf.info(str(tmp_path / "cli" / "sample_0.wav")).frames == 80
    with pytest.raises(SystemExit):
        main(["generate", f"run={mulaw_run.run_dir}", "prompt=hello"])
    assert "audio run" in capsys.readouterr().err


def codes_config(tmp, codec, pattern: str, steps: int, extra=()):
    """The speech-codes domain on synthetic tones at the tiny codec's 8 kHz: no espeak-ng."""
    cfg = quick(tmp, "audio_speech_codes", steps, [
        f"domain.tokenizer.codec={codec}", f"domain.data.pattern={pattern}",
        "domain.data.batch_size=4", "domain.data.val_fraction=0.25", *extra])
    with open_dict(cfg):
        cfg.domain.audio = {"_target_": "armodal.data.audio.SyntheticTones", "n": 24,
                            "sample_rate": 8000, "clip_seconds": 0.1}
    return cfg


@pytest.mark.parametrize("pattern", ["delay", "flatten"])
def test_codes_run_trains_evaluates_and_generates(pattern, tiny_audio_codec, tmp_path):
    result = train(codes_config(tmp_path, tiny_audio_codec, pattern, steps=6))
    run = load_run(result.run_dir)
    k = run.tokenizer.n_levels
    assert run.model.config.n_streams == (k if pattern == "delay" else 1)
    # 0.1 s at 400 frames/s = 40 frames; <bos> <boa> ... <eoa> <eos>, the context all but one.
    steps = 40 + k - 1 if pattern == "delay" else 40 * k
    assert run.model.config.max_seq_len == steps + 3
    bits = result.metrics["val/bits_per_code"]
    assert math.isclose(evaluate(str(result.run_dir)).bits_per_unit, bits, rel_tol=1e-5)
    assert bits < math.log2(run.tokenizer.codebook_size * (k if pattern == "flatten" else 1)) + 1
    wavs = sorted((result.run_dir / "samples").glob("*.wav"))
    assert len(wavs) == 2 and sf.info(str(wavs[0])).frames == 800
    paths = generate_audio(run, DecodingConfig(seed=0), num_samples=2, prompt="val",
                           prompt_seconds=0.05, out=str(tmp_path / "g"), progress=False)
    assert all(sf.info(str(p)).frames == 800 for p in paths)


def test_codes_run_refuses_another_codec(tiny_audio_codec, tmp_path):
    result = train(codes_config(tmp_path, tiny_audio_codec, "delay", steps=2,
                                extra=["sample_every_validation=false"]))
    weights = tiny_audio_codec / "codec.safetensors"
    saved = weights.read_bytes()
    try:
        weights.write_bytes(saved[:-4] + b"\0\0\0\0")
        with pytest.raises(ValueError, match="sha256"):
            load_run(result.run_dir)
    finally:
        weights.write_bytes(saved)
