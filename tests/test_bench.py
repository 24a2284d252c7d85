"""Smoke test of the benchmark suite: `bench/suite.py --quick` runs end to end and prints every
row, a table and one finite `figure` line per case (or n/a with a reason)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "bench" / "suite.py"

EXPECTED = [
    "target_val_loss", "draft_val_loss",
    "train_tokens_s", "train_mfu", "train_peak_mib",
    "greedy_b1", "greedy_b8", "greedy_b8_peak_mib", "sample_b1", "sample_b8", "beam4_b1",
    "ttft_b1",
    "spec_draft_b1", "spec_draft_b1_vs_plain", "spec_lookup_b1", "spec_lookup_b1_vs_plain",
    "spec_draft_b8_vs_plain", "spec_lookup_b8_vs_plain",
    "compiled_greedy",
    *(f"quant_{mode}_{kind}" for mode in ("int8", "int4", "bf16")
      for kind in ("weight_mib", "greedy_b1", "ppl")),
]
FIGURE = re.compile(r"^figure quick_(\w+): (.+)$", re.MULTILINE)
NUMBER = r"(-?[\d.]+(?:e[-+]?\d+)?)"


@pytest.fixture(scope="module")
def quick_output(tmp_path_factory) -> str:
    models = tmp_path_factory.mktemp("bench_models")
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SUITE), "--quick", "--models-dir", str(models)],
                          check=False, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_machine_line_reports_matmul_peaks(quick_output):
    line = next(l for l in quick_output.splitlines() if l.startswith("machine: "))
    peaks = re.search(rf"fp32 {NUMBER} GFLOP/s, bf16 {NUMBER} GFLOP/s", line)
    assert peaks and all(float(x) > 0 for x in peaks.groups()), line


def test_every_case_has_a_figure_line(quick_output):
    figures = dict(FIGURE.findall(quick_output))
    assert sorted(figures) == sorted(EXPECTED), sorted(set(figures) ^ set(EXPECTED))
    for name, text in figures.items():
        if text.startswith("n/a ("):  # a feature still missing says why
            assert len(text) > len("n/a ()"), name
            continue
        values = [float(v) for v in re.findall(rf"(?:^|\| peer [^|]*? |ratio ){NUMBER}", text)]
        assert values and all(math.isfinite(v) for v in values), (name, text)
        assert re.match(rf"{NUMBER} \S+", text), (name, text)


def test_table_and_greedy_parity(quick_output):
    assert "size quick" in quick_output and "case" in quick_output
    greedy = next(l for l in quick_output.splitlines()
                  if l.startswith("row ") and "case=greedy b1 " in l)
    assert "tokens equal" in greedy, greedy
