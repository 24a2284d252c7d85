"""`armodal train|generate|eval` as a user types them, including every bad-input message."""

import json
import shutil
import subprocess
import sys

import pytest

from armodal.cli import RECIPES_DIR, ROOT, compose_config, main, split_args


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_from_run_dir(char_run, capsys):
    code, out, _ = run_cli(["generate", f"run={char_run.run_dir}", "prompt=def ",
                            "decoding=greedy", "decoding.max_new_tokens=12"], capsys)
    text = out[:-1]  # print's newline
    assert code == 0 and text.startswith("def ") and len("def ") < len(text) <= len("def ") + 12
    # The prompt is verbatim (spaces, quotes, brackets), not parsed as a config value.
    code, out, err = run_cli(["generate", f"run={char_run.run_dir}", "prompt= x['a'] = ",
                              "format=jsonl", "decoding=greedy", "decoding.max_new_tokens=2"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["prompt"] == " x['a'] = "
    code, out, _ = run_cli(["generate", f"run={char_run.run_dir}", "prompt=x", "decoding.num_return_sequences=2",
                            "decoding=top_p", "decoding.seed=3", "decoding.max_new_tokens=8"],
                           capsys)
    assert code == 0 and out.count("--- sample") == 2


def test_eval_on_val_split_matches_training(char_run, capsys):
    code, out, _ = run_cli(["eval", f"run={char_run.run_dir}"], capsys)
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    # Training validated on 4 batches only; the full split agrees to within noise.
    assert result["nll"] == pytest.approx(char_run.final_val_loss, abs=0.3)
    assert result["bits_per_unit"] == pytest.approx(result["nll"] / 0.693147, rel=0.05)


def test_eval_on_a_given_file(char_run, corpus_file, tmp_path, capsys):
    sample = tmp_path / "held_out.txt"
    sample.write_text(corpus_file.read_text()[:5000])
    code, out, _ = run_cli(["eval", f"run={char_run.run_dir}", f"data={sample}"], capsys)
    assert code == 0 and "bits/byte" in out


@pytest.mark.parametrize("args,message", [
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["train", "no_such_recipe"], "unknown recipe 'no_such_recipe'; available: "),
    (["generate", "prompt=hi"], "run"),
    (["generate", "run=/nonexistent/run", "prompt=hi"], "does not exist"),
    (["eval", "run=/nonexistent/run"], "does not exist"),
    (["generate", "run=x", "decoding.no_such_field=1"], "no_such_field"),
])
def test_bad_input_is_one_clear_line(args, message, capsys):
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in err and "Traceback" not in err


def test_a_deleting_override_is_not_taken_for_a_recipe():
    """Hydra's `~key` (delete a key, e.g. one part of a mixture) has no "=" in it."""
    recipe, overrides = split_args(["multimodal_digits_captions", "~domain.mixture.text_to_image",
                                    "++domain.data.loss_weights={image:0.0}", "seed=1"])
    assert recipe == "multimodal_digits_captions"
    assert overrides == ["~domain.mixture.text_to_image", "++domain.data.loss_weights={image:0.0}",
                         "seed=1"]
    composed = compose_config(RECIPES_DIR, recipe, overrides)
    assert list(composed.domain.mixture) == ["image_to_text"]


def test_train_errors_are_one_clear_line(tmp_path):
    """Through the console entry point, as a user runs it (Hydra in charge of argv)."""
    cases = [
        (["train", "text_char_shakespeare", f"domain.source.path={tmp_path}/missing.txt"],
         "missing.txt"),
        (["train", "text_char_shakespeare"], "domain.source.path"),
        (["train", "no_such_key=3"], "no_such_key"),
    ]
    for args, message in cases:
        proc = subprocess.run([sys.executable, "-m", "armodal.cli", *args,
                               f"run_dir={tmp_path}/run"], capture_output=True, text=True,
                              cwd=tmp_path, timeout=120)
        assert proc.returncode != 0, args
        assert message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, (args, proc.stderr[-2000:])


def test_run_dir_without_weights_and_corrupt_weights(char_run, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(char_run.run_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run_cli(["generate", f"run={broken}", "prompt=a"], capsys)
    assert code == 2 and "safetensors" in err
    (broken / "model.safetensors").unlink()
    code, _, err = run_cli(["generate", f"run={broken}", "prompt=a"], capsys)
    assert code == 2 and "has no model.safetensors" in err


def test_prompt_outside_the_alphabet(char_run, capsys):
    code, _, err = run_cli(["generate", f"run={char_run.run_dir}", "prompt=\u2603 snowman"],
                           capsys)
    assert code == 2 and "\u2603" in err


def test_readme_first_screen_has_the_two_commands():
    readme = (ROOT / "README.md").read_text().splitlines()[:40]
    text = "\n".join(readme)
    assert "make demo" in text and "make test" in text
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_readme_commands_on_a_fresh_venv(tmp_path):
    """`make test`'s set-up and `make demo` from a clean copy of the repo (several minutes)."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=shutil.ignore_patterns(".venv", "runs", ".git",
                                                            "__pycache__", "*.egg-info"))
    demo = subprocess.run(["make", "demo", "ARGS=trainer.max_steps=20"], cwd=repo,
                          capture_output=True, text=True, timeout=1800)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "run finished" in demo.stdout
    run_dirs = list((repo / "runs" / "text_code_cpu").iterdir())
    assert (run_dirs[0] / "model.safetensors").is_file()


def test_generate_prompt_file_to_jsonl(char_run, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def \nclass \n")
    code, out, err = run_cli(["generate", f"run={char_run.run_dir}", f"prompt_file={prompts}",
                            "format=jsonl", "decoding=greedy", "decoding.max_new_tokens=6",
                            "decoding.top_logprobs=2"], capsys)
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["prompt"] for r in records] == ["def ", "class "]
    for r in records:
        assert len(r["tokens"]) == len(r["logprobs"]) == len(r["top_logprobs"]) <= 6
        assert r["finish_reason"] in ("length", "stop_token")
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("def \n"))
    code, out, _ = run_cli(["generate", f"run={char_run.run_dir}", "prompt_file=-",
                            "format=jsonl", "decoding=greedy", "decoding.max_new_tokens=6"],
                           capsys)
    assert code == 0 and json.loads(out)["tokens"] == records[0]["tokens"]


def test_generate_speculative_with_a_draft_run_and_prompt_lookup(char_run, capsys):
    """decoding=speculative with draft_run, and decoding=prompt_lookup, print greedy's text and
    one line of acceptance figures on stderr."""
    base = ["generate", f"run={char_run.run_dir}", "prompt=def f(x):\n    return ",
            "decoding.max_new_tokens=24"]
    code, greedy_text, _ = run_cli([*base, "decoding=greedy"], capsys)
    assert code == 0
    code, out, err = run_cli([*base, "decoding=speculative", f"draft_run={char_run.run_dir}"],
                             capsys)
    assert code == 0, err
    assert out == greedy_text
    assert "speculative: accepted" in err and "(100.0%)" in err  # the draft is the target
    code, out, err = run_cli([*base, "decoding=prompt_lookup", "format=jsonl"], capsys)
    assert code == 0, err
    assert json.loads(out)["prompt"] + json.loads(out)["text"] == greedy_text[:-1]
    assert "speculative: accepted" in err


def test_draft_run_must_share_the_tokens(char_run, capsys):
    import dataclasses

    from armodal.checkpoint import load_run
    from armodal.textgen import check_draft_run
    from armodal.tokenizers.text import ByteTokenizer

    run = load_run(char_run.run_dir)
    check_draft_run(run, run)
    with pytest.raises(ValueError, match="does not share the TokenSpace and tokenizer"):
        check_draft_run(run, dataclasses.replace(run, tokenizer=ByteTokenizer()))


def test_eval_and_generate_quantized(char_run, capsys):
    code, out, _ = run_cli(["eval", f"run={char_run.run_dir}"], capsys)
    full = json.loads(out.splitlines()[-1])
    code, out, err = run_cli(["eval", f"run={char_run.run_dir}", "quantize=int8"], capsys)
    assert code == 0, err
    quantized = json.loads(out.splitlines()[-1])
    assert quantized["nll"] != full["nll"]
    assert quantized["nll"] == pytest.approx(full["nll"], rel=0.01)
    code, out, err = run_cli(["generate", f"run={char_run.run_dir}", "prompt=def ",
                              "decoding=greedy", "decoding.max_new_tokens=8", "quantize=bf16"],
                             capsys)
    assert code == 0 and out.startswith("def "), err
    code, _, err = run_cli(["eval", f"run={char_run.run_dir}", "quantize=fp8"], capsys)
    assert code == 2 and "fp8" in err and "int8" in err
