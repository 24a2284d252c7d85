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

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset, RandomSampler

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
    gen = torch.Generator().manual_seed(seed)
    return ResumableLoader(data, RandomSampler(data, generator=gen), batch_size=4,
                           drop_last=True)


# ------------------------------------------------- per-item randomness, workers, restores


class RandomItems(Dataset):
    """20 items that draw random numbers: item i is (i, a draw from torch's, python's and
    numpy's global RNG), like a random crop, an augmentation or condition dropout."""

    random_items = True

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:  # (4,)
        return torch.tensor([i, int(torch.randint(1 << 30, ())), random.randrange(1 << 30),
                             int(np.random.randint(1 << 30))])


class UnseededItems(RandomItems):
    random_items = False  # draws all the same, undeclared: the global RNGs advance


def data_loader(dataset, seed: int, num_workers: int = 0) -> ResumableLoader:
    """What the data modules build: the sampler's generator is the loader's too."""
    gen = torch.Generator().manual_seed(seed)
    return ResumableLoader(dataset, RandomSampler(dataset, generator=gen), batch_size=4,
                           drop_last=True, generator=gen, num_workers=num_workers,
                           persistent_workers=num_workers > 0)


def epochs_of(loader, n: int) -> list[list]:
    """`n` epochs of batches, taken as Lightning takes them: it knows an epoch's length and
    never asks for a batch past the last (prefetching workers do)."""
    return [[batch.tolist() for _, batch in zip(range(len(loader)), loader)] for _ in range(n)]


def state_after(loader: ResumableLoader, epochs: int, batches: int) -> dict:
    """Train `epochs` whole epochs and `batches` batches more; the loader's state then."""
    for _ in range(epochs):
        for _ in loader:
            loader.step_done()
    iterator = iter(loader)
    for _ in range(batches):
        next(iterator)
        loader.step_done()
    return loader.state_dict()


def test_random_items_are_the_same_with_and_without_workers_in_the_same_order():
    data = RandomItems()
    main = epochs_of(data_loader(data, seed=3), 3)
    assert epochs_of(data_loader(data, seed=3, num_workers=2), 3) == main  # persistent workers
    # The order is the one a plain DataLoader(shuffle=True) with that generator gives.
    gen = torch.Generator().manual_seed(3)
    plain = DataLoader(list(range(20)), batch_size=4, shuffle=True, generator=gen,
                       drop_last=True)
    assert [[[item[0] for item in batch] for batch in epoch] for epoch in main] \
        == epochs_of(plain, 3)
    draws = {}  # (epoch, index) -> the item's three draws
    for e, epoch in enumerate(main):
        draws.update({(e, item[0]): tuple(item[1:]) for batch in epoch for item in batch})
    assert len(set(draws.values())) == len(draws) == 3 * 20  # fresh numbers per item and epoch
    other_seed = epochs_of(data_loader(data, seed=4), 1)[0]
    assert {item[0]: item[1:] for b in other_seed for item in b} \
        != {item[0]: item[1:] for b in main[0] for item in b}  # the run's seed matters


def test_fetching_random_items_leaves_the_main_process_rngs_alone():
    def states():
        return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].tolist()

    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    before = states()
    epochs_of(data_loader(RandomItems(), seed=3), 2)
    after = states()
    assert torch.equal(after[0], before[0]) and after[1:] == before[1:]
    epochs_of(data_loader(UnseededItems(), seed=3), 1)  # the control: its draws show
    assert not torch.equal(states()[0], before[0]) and states()[1] != before[1]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("dataset", [list(range(20)), RandomItems()], ids=["plain", "random"])
def test_a_restored_loader_continues_with_the_very_batches(dataset, num_workers):
    """Mid-epoch and at an epoch's end, in the first epoch and a later one (persistent workers
    draw their base seed from the shared generator in the first epoch only)."""
    expected = epochs_of(data_loader(dataset, seed=3, num_workers=num_workers), 4)
    for epochs, batches in [(0, 2), (1, 3), (0, 5), (1, 5)]:
        state = state_after(data_loader(dataset, seed=3, num_workers=num_workers), epochs,
                            batches)
        again = data_loader(dataset, seed=99, num_workers=num_workers)  # the state must win
        again.load_state_dict(state)
        # The rest of the epoch (none when it had ended), then the next one.
        rest = [expected[epochs][batches:], expected[epochs + 1]] if batches < 5 \
            else expected[epochs + 1:epochs + 3]
        assert epochs_of(again, 2) == rest, (epochs, batches)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_condition_dropout_resumes_exactly(num_workers):
    """A conditional image run's training batches, label dropout included: the same with and
    without workers, and the same after a restore as in the uninterrupted run."""
    from armodal.data.image_module import ImageDataModule
    from armodal.data.images import DigitsImages
    from armodal.tokenizers.image import PixelTokenizer

    class Few(DigitsImages):  # 60 digits: 45 train, 5 batches of 8 per epoch
        def load(self):
            return super().load().subset(torch.arange(60))

    def module(workers: int) -> ImageDataModule:
        dm = ImageDataModule(Few(), PixelTokenizer(8, 1, levels=17), batch_size=8,
                             val_fraction=0.25, conditional=True, cond_dropout=0.5, seed=0,
                             num_workers=workers)
        dm.setup()
        return dm

    def loader(workers: int) -> ResumableLoader:
        return module(workers).train_dataloader()

    expected = epochs_of(loader(0), 3)
    labels = torch.tensor([item[1] for epoch in expected for batch in epoch for item in batch])
    dropped = (labels == module(0).layout.prefix(None)[1]).float().mean()  # the null class
    assert 0.3 < dropped < 0.7
    if num_workers:
        assert epochs_of(loader(num_workers), 3) == expected
    for epochs, batches in [(1, 2), (0, 5)]:
        again = loader(num_workers)
        again.load_state_dict(state_after(loader(num_workers), epochs, batches))
        rest = expected[epochs][batches:] if batches < 5 else expected[epochs + 1]
        assert [batch.tolist() for batch in again] == rest, (epochs, batches)


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
