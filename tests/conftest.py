"""Shared fixtures: a small offline text corpus and one short training run reused by many tests."""

import sysconfig
from pathlib import Path

import pytest

from armodal.cli import RECIPES_DIR, compose_config


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """~150 KB of real text (Python source from the stdlib), offline on every machine."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text() for name in ("textwrap.py", "string.py",
                                                            "shlex.py", "difflib.py"))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text[:150_000])
    return path


def _quick_overrides(tmp: Path, steps: int = 30) -> list[str]:
    """Overrides that make any recipe train in seconds in a temp dir."""
    return [
        "model=tiny", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "trainer.limit_val_batches=4", "domain.data.batch_size=8", "domain.data.seq_len=64",
        f"domain.data.cache_dir={tmp / 'cache'}", f"run_dir={tmp / 'run'}",
        "decoding.max_new_tokens=16", "optim.scheduler.warmup_steps=5",
    ]


@pytest.fixture
def quick_overrides():
    return _quick_overrides


@pytest.fixture(scope="session")
def char_run(tmp_path_factory, corpus_file):
    """One short char-level training run (TrainResult), shared by the export/CLI tests."""
    from armodal.train import train

    tmp = tmp_path_factory.mktemp("char_run")
    cfg = compose_config(RECIPES_DIR, "text_char_shakespeare",
                         [f"domain.source.path={corpus_file}", *_quick_overrides(tmp, steps=60)])
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_codec(tmp_path_factory) -> Path:
    """An untrained (random) 28x28 -> 7x7 VQ codec directory: enough to test the plumbing."""
    import torch

    from armodal.codecs.artefact import save_codec
    from armodal.codecs.quantizers import VectorQuantizer
    from armodal.codecs.vqvae import VQVAE

    torch.manual_seed(0)
    model = VQVAE(VectorQuantizer(16, 8, kmeans_init=False), in_channels=1, downsample=4,
                  hidden=8, res_blocks=0)
    return save_codec(tmp_path_factory.mktemp("codec") / "codec", model.eval(),
                      meta={"image_size": [28, 28]})


@pytest.fixture(scope="session")
def tiny_audio_codec(tmp_path_factory) -> Path:
    """An untrained (random) 8 kHz audio codec directory, hop 20, 3 levels of 16 codes."""
    import torch

    from armodal.codecs.artefact import save_codec
    from armodal.codecs.audio_codec import AudioCodec
    from armodal.codecs.rvq import ResidualVQ

    torch.manual_seed(0)
    model = AudioCodec(ResidualVQ(3, 16, 8, kmeans_init=False), sample_rate=8000,
                       strides=(4, 5), channels=4, dilations=(1,))
    return save_codec(tmp_path_factory.mktemp("audio_codec") / "codec", model.eval())


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-model tests: on a shared 2-core machine, spinning
    thread pools made the server tests ~10x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
