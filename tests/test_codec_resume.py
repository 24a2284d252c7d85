"""Exact resume of the codec trainers: an image codec run killed (SIGKILL, data workers on) and
an audio codec run stopped (SIGTERM) in a subprocess, continued with resume=auto, end with the
very codec weights and figures of an uninterrupted run, bit for bit: random flips and random
crops drawn per item, epoch boundaries, k-means init and the LR schedule included."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from armodal.cli import CONF_DIR, compose_config
from armodal.codecs.artefact import CONFIG, WEIGHTS
from armodal.train import train

IMAGE_STEPS, AUDIO_STEPS = 150, 100
QUIET = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "logger={}",
         "checkpoint_every=5", "optim.scheduler.warmup_steps=3"]


def image_overrides(run_dir: Path, num_workers: int = 0) -> list[str]:
    """A tiny VQ-VAE on sklearn digits (8x8 -> 4x4 codes of 16) with the config's random
    horizontal flips: epochs of 14 batches, last.ckpt every 5 steps."""
    return [f"run_dir={run_dir}", f"trainer.max_steps={IMAGE_STEPS}",
            "trainer.val_check_interval=50", *QUIET,
            "data.images._target_=armodal.data.images.DigitsImages", "data.val_fraction=0.5",
            "data.batch_size=64", f"data.num_workers={num_workers}", "model.hidden=8",
            "model.res_blocks=1", "model.downsample=2", "model.quantizer.codebook_size=16",
            "model.quantizer.dim=8"]


def audio_overrides(run_dir: Path) -> list[str]:
    """A tiny codec on 40 synthetic clips of 0.25 s, trained on random 0.1 s crops with
    quantizer dropout: epochs of 9 batches, last.ckpt every 5 steps."""
    return [f"run_dir={run_dir}", f"trainer.max_steps={AUDIO_STEPS}",
            "trainer.val_check_interval=50", *QUIET,
            "~data.audio.n_utterances=2000", "~data.audio.clip_seconds=2.0",  # (the CLI takes
            # a bare ~key for a recipe name)
            "data.audio._target_=armodal.data.audio.SyntheticTones", "+data.audio.n=40",
            "+data.audio.clip_seconds=0.25", "data.audio.sample_rate=8000",
            "data.batch_size=4", "data.segment_seconds=0.1", "model.strides=[2,4]",
            "model.channels=4", "model.dilations=[1]", "model.quantizer.n_levels=2",
            "model.quantizer.codebook_size=16", "model.quantizer.dim=8",
            "loss.fft_sizes=[128]", "loss.n_mels=[16]"]


CONFIGS = {"train_codec": image_overrides, "train_audio_codec": audio_overrides}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread here and in the subprocesses (the same count everywhere keeps float sums
    identical); on a shared 2-core machine a second thread mostly waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_here(config: str, overrides: list[str]):
    os.environ.setdefault("WANDB_MODE", "disabled")
    return train(compose_config(CONF_DIR, config, overrides))


def codec_of(run_dir: Path) -> tuple[dict, dict]:
    """The saved codec's weights and its reported held-out figures."""
    codec = run_dir / "codec"
    return load_file(codec / WEIGHTS), json.loads((codec / CONFIG).read_text())["metrics"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    """Each codec trained start to end in one go, without data workers."""
    runs = {}
    for config, overrides in CONFIGS.items():
        run_dir = tmp_path_factory.mktemp(config) / "run"
        train_here(config, overrides(run_dir))
        runs[config] = codec_of(run_dir)
    return runs


def start_training(config: str, overrides: list[str]) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "armodal.cli", "train", str(CONF_DIR / f"{config}.yaml"),
               *overrides]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not last.is_file():
        assert proc.poll() is None, f"training ended before its first checkpoint: " \
                                    f"{proc.stderr.read()}"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.02)


def checkpoint_step(last: Path) -> int:
    return torch.load(last, map_location="cpu", weights_only=True)["global_step"]


def resume_and_compare(config: str, overrides: list[str], run_dir: Path, steps: int,
                       expected: tuple[dict, dict]) -> None:
    result = train_here(config, [*overrides, "resume=auto"])
    assert result.trainer.ckpt_path == str(run_dir / "checkpoints" / "last.ckpt")  # not afresh
    assert result.steps == steps
    weights, metrics = codec_of(run_dir)
    assert weights.keys() == expected[0].keys()
    for name, tensor in expected[0].items():
        assert torch.equal(weights[name], tensor), f"{name} differs after resume"
    assert metrics == expected[1]


def test_image_codec_sigkill_then_resume_auto_with_workers_is_bit_exact(tmp_path,
                                                                        uninterrupted):
    """The uninterrupted run read its items in the main process; this one in 2 persistent
    workers: the flipped images, and so the weights, are the same."""
    run_dir = tmp_path / "run"
    overrides = image_overrides(run_dir, num_workers=2)
    proc = start_training("train_codec", overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last)
    time.sleep(random.Random().uniform(0.0, 1.0))  # somewhere after the first checkpoint
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (run_dir / "codec").exists()
    step = checkpoint_step(last)
    assert 5 <= step < IMAGE_STEPS and step % 5 == 0
    print(f"SIGKILL after the checkpoint of step {step}")
    resume_and_compare("train_codec", overrides, run_dir, IMAGE_STEPS,
                       uninterrupted["train_codec"])


def test_audio_codec_sigterm_stops_cleanly_then_resume_auto_is_bit_exact(tmp_path,
                                                                         uninterrupted):
    run_dir = tmp_path / "run"
    overrides = audio_overrides(run_dir)
    proc = start_training("train_audio_codec", overrides)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped on SIGTERM at step" in err and "resume=auto" in err
    step = int(err.split("at step ")[1].split(":")[0])
    assert checkpoint_step(last) == step < AUDIO_STEPS  # saved where it stopped
    assert not (run_dir / "codec").exists()  # a stopped run saves no codec
    resume_and_compare("train_audio_codec", overrides, run_dir, AUDIO_STEPS,
                       uninterrupted["train_audio_codec"])


@pytest.mark.parametrize("config,items", [("train_codec", "images"),
                                          ("train_audio_codec", "clips")])
def test_a_train_split_smaller_than_a_batch_is_refused(config, items, tmp_path):
    overrides = [*CONFIGS[config](tmp_path / "run"), "data.batch_size=1000"]
    with pytest.raises(ValueError, match=rf"train split has \d+ {items}, fewer than "
                                         rf"data.batch_size=1000"):
        train_here(config, overrides)
