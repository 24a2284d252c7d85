"""armodal against Hugging Face transformers on the same weights, in one process: one table.

    python bench/suite.py --quick                     # tiny model, < 1 minute: a smoke test
    python bench/suite.py                             # ~20M and ~120M Llama-shaped models
    python bench/suite.py --sizes 20m --rows decode,spec

First a machine line (CPU, cores, threads, versions, measured fp32 / bf16 matmul peaks), then per
model size one row per case as it completes, a table, and at the very end one `figure` line per
row: `figure <size>_<case>: <value> <unit> | peer <peer> <value> <unit> | ratio <x>`, the
ratio always armodal / peer, after one `target` line per goal of the issue (PASS / FAIL). A case
whose feature is missing prints n/a with the reason.

Row groups (--rows):
    models   each model's parameters and held-out loss after its brief training
    train    training step tokens/s, MFU, peak memory                        (cases_train.py)
    decode   greedy / sampling tokens/s at batch 1, 8, 32, 4-beam at 1 and 8 (32 would be 128
             rows), greedy peak memory at the largest batch                 (cases_decode.py)
    ttft     time to first token at batch 1
    spec     draft-model and prompt-lookup speculative decoding vs transformers and vs plain
    compile  compiled vs eager decode step
    quant    int8 / int4 / bf16 weights: memory, batch-1 tokens/s, perplexity (cases_quant.py)

The models are trained on first use (models.py, ~30 minutes for both sizes on 2 cores) and
cached under --models-dir; training time is not part of any figure. The cases then take ~8
minutes for 20m and ~16 for 120m on 2 cores. On a machine shared with other work, --threads 1
gives steadier figures (two threads of small ops stall on each other when a core is taken).
Timing and memory methods: measure.py. Workload per size: context.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from cases_decode import compile_rows, decode_rows, speculative_rows, ttft_rows
from cases_quant import quant_rows
from cases_train import train_rows
from context import SETTINGS, Bench
from measure import machine_line, matmul_peak_gflops
from models import SIZES, load_hf, prepare
from report import Row, Target, check_targets, missing, print_row, print_table

DEFAULT_MODELS_DIR = Path(__file__).resolve().parent / ".models"


def model_rows(bench: Bench) -> Iterator[Row]:
    """How well each model learned: held-out loss (nats/token), no peer."""
    for role in ("target", "draft"):
        model, report = getattr(bench.prep, role), bench.prep.reports[role]
        yield Row(bench.name(f"{role}_val_loss"), f"{role} held-out loss", "nats/token",
                  report["val_loss"], "", None,
                  f"{model.num_params() / 1e6:.1f}M params, {report['steps']} steps, train "
                  f"loss {report['train_loss']:.3f}")


# The goals for this suite (CPU, 2 cores); None: every size that ran.
TARGETS = [
    Target("spec_draft_b1_vs_plain", ">=", 1.8, ("120m",)),
    Target("spec_draft_b8_vs_plain", ">", 1.0, ("120m",)),
    Target("greedy_b1", ">=", 2.0), Target("greedy_b8", ">=", 2.0),
    Target("spec_draft_b1", ">=", 1.5),
    Target("quant_int8_weight_mib", "<=", 0.3),
    Target("quant_int8_ppl", "<=", 1.01),
    Target("quant_int8_greedy_b1", ">=", 1.0, ("120m",)),
    Target("train_tokens_s", ">=", 1.2),
]

GROUPS: dict[str, Callable[[Bench], Iterator[Row]]] = {
    "models": model_rows, "train": train_rows, "decode": decode_rows, "ttft": ttft_rows,
    "spec": speculative_rows, "compile": compile_rows, "quant": quant_rows,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and few tokens (a smoke test, < 1 minute)")
    parser.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR,
                        help="where trained models and the tokenized corpus are cached")
    parser.add_argument("--sizes", default="20m,120m", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--rows", default=",".join(GROUPS), help=f"comma list of {list(GROUPS)}")
    parser.add_argument("--runs", type=int, help="timed runs per case (median); default per size")
    parser.add_argument("--threads", type=int,
                        help="torch threads (default: torch's own, 1 with --quick, where tiny "
                             "ops on a busy machine would spend their time in thread sync)")
    parser.add_argument("--train-budget", type=float,
                        help="seconds of training per uncached model (default per size)")
    parser.add_argument("--train-steps", type=int,
                        help="train uncached targets and drafts this many steps (default per "
                             "size; a different count is a different cached model)")
    parser.add_argument("--train-device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where uncached models are trained (the benchmark itself is CPU)")
    args = parser.parse_args(argv)
    args.sizes = ["quick"] if args.quick else args.sizes.split(",")
    args.rows = args.rows.split(",")
    for value, allowed, flag in ((args.sizes, SIZES, "--sizes"), (args.rows, GROUPS, "--rows")):
        bad = [v for v in value if v not in allowed]
        if bad:
            parser.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return args


def prepare_bench(name: str, args: argparse.Namespace, peaks: tuple[float, float]) -> Bench:
    """One size's trained (or cached) models on both sides, with the run's settings."""
    settings = SETTINGS[name]
    if args.runs is not None:
        settings = dataclasses.replace(settings, runs=args.runs)
    size = SIZES[name]
    if args.train_steps is not None:
        size = dataclasses.replace(
            size, target_schedule=dataclasses.replace(size.target_schedule, steps=args.train_steps),
            draft_schedule=dataclasses.replace(size.draft_schedule, steps=args.train_steps))
    bf16_fast = args.train_device != "cpu" or peaks[1] > 1.2 * peaks[0]
    prep = prepare(size, args.models_dir, autocast_bf16=bf16_fast,
                   budget_s=args.train_budget, device=args.train_device)
    return Bench(prep, load_hf(prep.target_dir), load_hf(prep.draft_dir), settings, *peaks)


def run_size(name: str, args: argparse.Namespace, peaks: tuple[float, float]) -> list[Row]:
    """Prepare one size's models, then run every selected group, printing rows as they come."""
    bench = prepare_bench(name, args, peaks)
    prep, settings = bench.prep, bench.settings
    start = time.perf_counter()
    print(f"size {name}: target {prep.target.num_params():,} params, draft "
          f"{prep.draft.num_params():,}; prompt {settings.prompt_len} tokens of held-out code, "
          f"{settings.new_tokens} new tokens, median of {settings.runs} runs after a warm-up",
          flush=True)
    rows = []
    for group in args.rows:
        group_start = time.perf_counter()
        try:
            for row in GROUPS[group](bench):
                print_row(row)
                rows.append(row)
        except Exception as err:  # a broken group must not hide the others' figures
            row = missing(bench.name(group), group, "", "", f"{type(err).__name__}: {err}"
                          .splitlines()[0][:200])
            print_row(row)
            rows.append(row)
        print(f"group {name}/{group}: {time.perf_counter() - group_start:.0f} s", flush=True)
    print(f"size {name}: {time.perf_counter() - start:.0f} s of cases (training excluded)",
          flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    threads = args.threads or (1 if args.quick else None)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = min(SETTINGS[s].matmul_n for s in args.sizes)
    peaks = (matmul_peak_gflops(torch.float32, n), matmul_peak_gflops(torch.bfloat16, n))
    print(machine_line(*peaks), flush=True)
    rows: dict[str, list[Row]] = {}
    for name in args.sizes:
        rows[name] = run_size(name, args, peaks)
    for name, size_rows in rows.items():
        print_table(f"size {name}", size_rows)
    print(f"\nmodels-dir {args.models_dir}\n")
    every = [row for size_rows in rows.values() for row in size_rows]
    print("targets (ratios; meaningful for 20m / 120m on a quiet machine):")
    for line in check_targets(TARGETS, rows):
        print(line)
    print()
    for row in every:
        print(row.figure_line())
    return every


if __name__ == "__main__":
    main()
