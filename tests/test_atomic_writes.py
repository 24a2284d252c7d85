"""A process killed while writing a run directory or a Hugging Face export leaves either the
previous good state or an explicitly unfinished directory, never a torn file that loads
(issue 10, atomic writes). The kill is injected where the weights are being written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import armodal.checkpoint as checkpoint
import armodal.hf as hf
from armodal.checkpoint import atomic_write_text, load_run, save_run


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, not even `except Exception` handlers."""


def dies_after_some_bytes(real_save):
    def save(tensors_or_model, path, *args, **kwargs):
        real_save(tensors_or_model, path, *args, **kwargs)
        with open(path, "r+b") as f:  # the file as a killed write leaves it: cut short
            f.truncate(1000)
        raise Killed
    return save


def test_a_run_dir_rewritten_and_killed_midway_reads_as_unfinished(char_run, tmp_path,
                                                                     monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(char_run.run_dir, run_dir)
    good = load_run(run_dir)
    monkeypatch.setattr(checkpoint, "save_model", dies_after_some_bytes(checkpoint.save_model))
    with pytest.raises(Killed):
        save_run(run_dir, good.model, good.space, good.tokenizer, extra={"steps": 1})
    # The weights in place are the old, whole ones; the torn write is only the .tmp beside
    # them; the config went first, so the directory says it did not finish.
    assert (run_dir / "model.safetensors").read_bytes() == \
        (char_run.run_dir / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError, match="did not finish"):
        load_run(run_dir)
    monkeypatch.undo()
    save_run(run_dir, good.model, good.space, good.tokenizer, extra=good.meta)  # a rerun mends it
    again = load_run(run_dir)
    for name, tensor in good.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], tensor)


def test_a_killed_hf_export_leaves_no_config_beside_torn_weights(char_run, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    model = load_run(char_run.run_dir).model
    hf.save_llama(model, out)
    first = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(hf, "save_file", dies_after_some_bytes(hf.save_file))
    with pytest.raises(Killed):
        hf.save_llama(model, out)
    # from_pretrained needs config.json: without it the half-written export cannot be loaded
    # as if it were whole, and the previous weights file is still intact.
    assert not (out / "config.json").exists()
    assert (out / "model.safetensors").read_bytes() == first
    monkeypatch.undo()
    hf.save_llama(model, out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == \
        model.config.n_layer


def test_atomic_write_text_killed_midway_keeps_the_old_text(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    atomic_write_text(path, '{"old": true}')

    def torn_write(self, text, *args, **kwargs):
        with open(self, "w") as f:
            f.write(text[:3])
        raise Killed

    monkeypatch.setattr(type(path), "write_text", torn_write)
    with pytest.raises(Killed):
        atomic_write_text(path, '{"new": true, "long": "' + "x" * 1000 + '"}')
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"old": True}
