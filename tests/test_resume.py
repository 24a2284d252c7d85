"""Exact resume: a training run killed (SIGKILL) or stopped (SIGTERM) in a subprocess and
continued with resume=auto ends with the very weights of an uninterrupted run, bit for bit, with
dropout on and across epoch boundaries (the data order and position, every RNG, the optimizer
and the LR schedule all come back)."""

from __future__ import annotations

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

from armodal.cli import RECIPES_DIR, compose_config
from armodal.resume import ResumableLoader
from armodal.train import train

STEPS = 200


def overrides(corpus: Path, run_dir: Path) -> list[str]:
    """A tiny char model with dropout, epochs of 14 batches, last.ckpt every 5 steps."""
    return [f"domain.source.path={corpus}", "model=tiny", "model.dropout=0.1",
            f"trainer.max_steps={STEPS}", "trainer.val_check_interval=50",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "trainer.limit_val_batches=2", "domain.data.batch_size=8", "domain.data.seq_len=32",
            f"domain.data.cache_dir={run_dir.parent / 'cache'}", "optim.scheduler.warmup_steps=3",
            "checkpoint_every=5", "sample_every_validation=false", f"run_dir={run_dir}"]


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, corpus_file) -> Path:
    path = tmp_path_factory.mktemp("small") / "small.txt"
    path.write_text(corpus_file.read_text()[:2000] * 2)  # val's characters are also in train
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_corpus) -> dict:
    run_dir = tmp_path_factory.mktemp("full") / "run"
    train(compose_config(RECIPES_DIR, "text_char_shakespeare", overrides(small_corpus, run_dir)))
    return load_file(run_dir / "model.safetensors")


def start_training(corpus: Path, run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "armodal.cli", "train", "text_char_shakespeare",
               *overrides(corpus, run_dir)]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait_for_checkpoint(proc: subprocess.Popen, last: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not last.is_file():
        assert proc.poll() is None, f"training ended before its first checkpoint: {proc.stderr}"
        assert time.monotonic() < deadline, "no checkpoint within the timeout"
        time.sleep(0.05)


def checkpoint_step(last: Path) -> int:
    return torch.load(last, map_location="cpu", weights_only=False)["global_step"]


def resume_and_compare(corpus: Path, run_dir: Path, expected: dict) -> None:
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare",
                         [*overrides(corpus, run_dir), "resume=auto"])
    result = train(cfg)
    assert result.steps == STEPS
    weights = load_file(run_dir / "model.safetensors")
    assert weights.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), f"{name} differs after resume"


def test_sigkill_at_a_random_step_then_resume_auto_is_bit_exact(tmp_path, small_corpus,
                                                                  uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_training(small_corpus, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last)
    time.sleep(random.Random().uniform(0.0, 1.0))  # somewhere after the first checkpoint
    proc.kill()
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (run_dir / "model.safetensors").exists()
    step = checkpoint_step(last)
    assert 5 <= step < STEPS and step % 5 == 0
    print(f"SIGKILL after the checkpoint of step {step}")
    resume_and_compare(small_corpus, run_dir, uninterrupted)


def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path, small_corpus, uninterrupted):
    run_dir = tmp_path / "run"
    proc = start_training(small_corpus, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    wait_for_checkpoint(proc, last)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped on SIGTERM at step" in err and "resume=auto" in err
    step = int(err.split("at step ")[1].split(":")[0])
    assert checkpoint_step(last) == step < STEPS  # saved where it stopped, not a step earlier
    assert not (run_dir / "model.safetensors").exists()  # a stopped run is not exported
    resume_and_compare(small_corpus, run_dir, uninterrupted)


def test_resume_auto_without_a_checkpoint_starts_afresh(tmp_path, small_corpus, uninterrupted):
    resume_and_compare(small_corpus, tmp_path / "run", uninterrupted)


def test_loader_resumes_mid_epoch_and_after_a_whole_epoch():
    data = list(range(20))  # 5 batches of 4 per epoch
    reference = make_loader(data, seed=3)
    epochs = [[batch.tolist() for batch in reference] for _ in range(2)]  # uninterrupted
    assert epochs[0] != epochs[1]  # each epoch has its own order
    for taken in (0, 2, 5):
        loader = make_loader(data, seed=3)
        batches = iter(loader)
        for _ in range(taken):
            next(batches)
            loader.step_done()
        state = loader.state_dict()
        again = make_loader(data, seed=99)  # another seed: the restored state must win
        again.load_state_dict(state)
        expected = epochs[0][taken:] if taken < 5 else epochs[1]
        assert [batch.tolist() for batch in again] == expected


def make_loader(data: list[int], seed: int) -> ResumableLoader:
    from torch.utils.data import RandomSampler

    gen = torch.Generator().manual_seed(seed)
    return ResumableLoader(data, RandomSampler(data, generator=gen), batch_size=4,
                           drop_last=True)


def test_a_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, small_corpus,
                                                             monkeypatch, uninterrupted):
    """A torn write: the third save dies after writing half its bytes. last.ckpt is still the
    previous, loadable checkpoint, and resume=auto continues from it."""
    import armodal.resume as resume

    real_save, saves = torch.save, []

    def torn_save(obj, f):
        saves.append(obj["global_step"])
        if len(saves) == 3:
            f.write(b"\x00" * 1000)  # half a file, then the process "dies"
            raise RuntimeError("killed while saving")
        real_save(obj, f)

    monkeypatch.setattr(resume.torch, "save", torn_save)
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="killed while saving"):
        train(compose_config(RECIPES_DIR, "text_char_shakespeare",
                             overrides(small_corpus, run_dir)))
    monkeypatch.undo()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == saves[1] == 10  # the save before the torn one
    assert (run_dir / "checkpoints" / "last.ckpt.tmp").stat().st_size == 1000
    resume_and_compare(small_corpus, run_dir, uninterrupted)


class _Hostile:
    """Unpickling this runs a shell command: what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_hostile_checkpoint_is_refused_without_running_anything(tmp_path, small_corpus):
    marker = tmp_path / "pwned"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": {}, "payload": _Hostile(marker)}, hostile)
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare",
                         [*overrides(small_corpus, tmp_path / "run"), f"resume={hostile}"])
    with pytest.raises(ValueError, match="refusing checkpoint .*hostile.ckpt"):
        train(cfg)
    assert not marker.exists()  # nothing ran
