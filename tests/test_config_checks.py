"""Config values are checked when the config is composed, before any data is read: a bad value
is one line naming its key; every shipped recipe passes; the CLI's errors are one line unless
--debug asks for the traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from armodal.cli import RECIPES_DIR, available_recipes, compose_config, main
from armodal.cli_errors import one_line, suggest_key
from armodal.config_checks import ConfigError, check_train_config
from armodal.train import train


@pytest.mark.parametrize("recipe", available_recipes())
def test_every_recipe_passes_the_checks(recipe):
    check_train_config(compose_config(RECIPES_DIR, recipe, []))


@pytest.mark.parametrize("override,key", [
    ("seed=abc", "seed='abc'"),
    ("seed=-1", "seed=-1"),
    ("seed=4294967296", "seed=4294967296"),  # Lightning would pick a random seed instead
    ("compile=yes", "compile='yes'"),
    ("nonfinite=ignore", "nonfinite='ignore'"),
    ("checkpoint_every=0", "checkpoint_every=0"),
    ("resume=/no/such.ckpt", "resume='/no/such.ckpt'"),
    ("model.n_layer=0", "model.n_layer=0"),
    ("model.n_layer=2.5", "model.n_layer=2.5"),
    ("model.n_layer=true", "model.n_layer=True"),  # a bool is not a layer count
    ("model.dropout=1.0", "model.dropout=1.0"),
    ("model.rope_theta=0", "model.rope_theta=0"),
    ("model.sliding_window=0", "model.sliding_window=0"),
    ("model.n_head=5", "model: invalid ModelConfig: d_model=128 must be divisible by n_head=5"),
    ("optim.optimizer.lr=-1e-3", "optim.optimizer.lr=-0.001"),
    ("optim.optimizer.lr=nan", "optim.optimizer.lr=nan"),
    ("optim.optimizer.betas=[0.9,1.0]", "optim.optimizer.betas=[0.9, 1.0]"),
    ("optim.scheduler.warmup_steps=-1", "optim.scheduler.warmup_steps=-1"),
    ("optim.scheduler.min_lr_ratio=2", "optim.scheduler.min_lr_ratio=2"),
    ("trainer.max_steps=0", "trainer.max_steps=0"),
    ("trainer.precision=fp8", "trainer.precision='fp8'"),
    ("trainer.accelerator=tpuv9", "trainer.accelerator='tpuv9'"),
    ("trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5"),
    ("domain.data.seq_len=0", "domain.data.seq_len=0"),
    ("domain.data.val_fraction=1", "domain.data.val_fraction=1"),
    ("+domain.data.num_workers=-2", "domain.data.num_workers=-2"),
    ("decoding.temperature=-1", "decoding: invalid DecodingConfig: temperature=-1"),
])
def test_a_bad_value_is_refused_naming_its_key(override, key):
    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [override])
    with pytest.raises(ConfigError) as refusal:
        check_train_config(cfg)
    message = str(refusal.value)
    assert message.startswith(key) and ("expected" in message or "invalid" in message), message
    assert "\n" not in message


@pytest.mark.parametrize("recipe,override,key", [
    ("image_vq_tokenizer", "data.batch_size=0", "data.batch_size=0"),
    ("image_vq_tokenizer", "data.val_fraction=0", "data.val_fraction=0"),
    ("audio_codec", "data.num_workers=-1", "data.num_workers=-1"),
    ("audio_codec", "trainer.max_steps=-5", "trainer.max_steps=-5"),
])
def test_the_codec_configs_are_checked_too(recipe, override, key):
    with pytest.raises(ConfigError, match=f"^{key}"):
        check_train_config(compose_config(RECIPES_DIR, recipe, [override]))


def test_train_refuses_before_touching_the_disk(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(RECIPES_DIR, "text_code_cpu", [f"run_dir={run_dir}", "seed=abc"])
    with pytest.raises(ConfigError, match="^seed='abc'"):
        train(cfg)
    assert not run_dir.exists()


def test_an_unknown_key_suggests_the_nearest_one():
    base = compose_config(RECIPES_DIR, "text_code_cpu", [])
    assert suggest_key(base, "model.n_layr") == "model.n_layer"
    assert suggest_key(base, "optim.optimizer.lrr") == "optim.optimizer.lr"
    assert suggest_key(base, "completely.unrelated") is None
    with pytest.raises(Exception) as refusal:
        compose_config(RECIPES_DIR, "text_code_cpu", ["modle.n_layer=2"])
    line = one_line(refusal.value, lambda: base)
    assert line == ("unknown config key 'modle.n_layer' (did you mean model.n_layer?); "
                    "to add a new key write +modle.n_layer=...")


def test_entries_added_to_a_dict_key_get_the_syntax_that_adds_them():
    """domain.data.loss_weights is {text: 4.0} in the recipe: `key={image: 0.5}` merges into it
    and struct mode refuses the new name; the message must not call the existing key unknown."""
    base = compose_config(RECIPES_DIR, "multimodal_digits_captions", [])
    with pytest.raises(Exception) as refusal:
        compose_config(RECIPES_DIR, "multimodal_digits_captions",
                       ["domain.data.loss_weights={image:0.5}"])
    assert one_line(refusal.value, lambda: base) == (
        "domain.data.loss_weights holds no 'image' yet; to add entries write "
        "++domain.data.loss_weights={...} or +domain.data.loss_weights.image=...")
    composed = compose_config(RECIPES_DIR, "multimodal_digits_captions",
                              ["++domain.data.loss_weights={image:0.5}"])
    assert dict(composed.domain.data.loss_weights) == {"text": 4.0, "image": 0.5}


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(args)
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("args,line", [
    (["train", "text_code_cpu", "model.n_layr=2"],
     "armodal train: error: unknown config key 'model.n_layr' (did you mean model.n_layer?)"),
    (["train", "text_code_cpu", "trainer=laptop"],
     "armodal train: error: trainer=laptop: no such option; available: cpu, ddp, ddp_gpu, debug"),
    (["train", "text_code_cpu", "model.dropout=1.5"],
     "armodal train: error: model.dropout=1.5: expected a finite number in [0, 1)"),
    (["generate", "run=x", "decoding=greedyy"],
     "armodal generate: error: decoding=greedyy: no such option; available: beam, default"),
    (["train", "actions_rl"],
     "armodal train: error: init_run is required (the config leaves it ???); pass init_run=..."),
    (["eval", "run=x", "actions.episods=3"],
     "armodal eval: error: unknown config key 'actions.episods' (did you mean actions.episodes?)"),
])
def test_cli_errors_are_one_line_with_the_fix(args, line, capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    code, err = run_cli(args, capsys)
    assert code == 2
    assert err.startswith(line) and err.count("\n") == 1, err


def test_debug_shows_the_traceback(tmp_path):
    """--debug anywhere on the line: the error comes with its traceback (and Hydra's own
    errors with theirs, through HYDRA_FULL_ERROR)."""
    command = [sys.executable, "-m", "armodal.cli", "train", "text_code_cpu", "seed=abc"]
    quiet = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    loud = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == ["armodal train: error: seed='abc': expected "
                                                 "an integer >= 0 and <= 4294967295"]
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "ConfigError" in loud.stderr
