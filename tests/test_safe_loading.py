"""A run directory is data: a config.json naming code outside armodal is refused, and runs
nothing (issue 10, safe loading)."""

import json
import shutil

import pytest

from armodal.evaluate import evaluate


@pytest.mark.parametrize("source", [
    {"_target_": "os.system", "command": "touch {marker}"},
    {"_target_": "armodal.data.sources.TextSource",  # hidden one level down
     "path": {"_target_": "os.system", "command": "touch {marker}"}},
])
def test_eval_refuses_foreign_targets_in_a_run_config(char_run, tmp_path, source):
    run = tmp_path / "run"
    shutil.copytree(char_run.run_dir, run)
    marker = tmp_path / "pwned"
    config = json.loads((run / "config.json").read_text())
    config["train_config"]["domain"]["source"] = json.loads(
        json.dumps(source).replace("{marker}", str(marker)))
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"domain\.source(\.path)?\._target_='os\.system'"):
        evaluate(str(run))
    assert not marker.exists(), "the hostile target ran"
