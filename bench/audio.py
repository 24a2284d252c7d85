"""Audio domain figures: held-out bits against a unigram peer, and generation speed.

    python bench/audio.py mulaw --run <audio_speech_mulaw run dir>
    python bench/audio.py codes --run <audio_speech_codes run dir>

mulaw: exact bits per sample of the run on its held-out clips (`armodal eval`), against a
    per-sample-independent model: one categorical over the 2^bits mu-law levels, add-half
    smoothed, fitted on the train clips and scored on the same held-out samples. Then the time
    to generate one second of audio at batch 1 with the KV cache.
codes: the codes LM's held-out NLL per code against a unigram model of the same codes (one
    categorical per codebook level, fitted on the train clips), the issue's "at least 40%
    below" figure. Then the time to generate one clip of the run's length at batch 4, and the
    model steps it took (frames + K - 1 under the delay pattern).
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from armodal.audiogen import sample_audio
from armodal.checkpoint import load_run
from armodal.data.audio_module import AudioDataModule, AudioLayout
from armodal.evaluate import evaluate
from armodal.generation import DecodingConfig


def unigram_nats(train_codes: torch.Tensor, val_codes: torch.Tensor, size: int,
                 alpha: float = 0.5) -> float:
    """Mean NLL (nats) of val codes (N, [K,] T) under per-level categoricals fitted on train
    codes (add-alpha smoothing); one level when there is no K axis."""
    if train_codes.dim() == 2:
        train_codes, val_codes = train_codes[:, None], val_codes[:, None]
    total, count = 0.0, 0
    for level in range(train_codes.shape[1]):
        counts = torch.bincount(train_codes[:, level].flatten(), minlength=size).double()
        logp = ((counts + alpha) / (counts + alpha).sum()).log()
        values = val_codes[:, level].flatten()
        total -= float(logp[values].sum())
        count += values.numel()
    return total / count


@torch.inference_mode()
def level_nats(run, sequences: torch.Tensor, batch_size: int = 16) -> list[float]:
    """Mean NLL (nats) of the code targets of each model stream (= codebook level under the
    delay and parallel patterns) over val sequences (N, K, L); pads and structure excluded."""
    lo = run.space.offset("audio")
    hi = lo + run.space.modalities["audio"]
    totals = torch.zeros(sequences.shape[1], dtype=torch.float64)
    counts = torch.zeros_like(totals)
    for batch in sequences.split(batch_size):
        logits = run.model(batch[..., :-1]).float()  # (B, K, L-1, V)
        targets = batch[..., 1:]  # (B, K, L-1)
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, -2), targets.flatten(),
                                                reduction="none").view(targets.shape)
        is_code = (targets >= lo) & (targets < hi)
        totals += (nll * is_code).sum((0, 2)).double()
        counts += is_code.sum((0, 2)).double()
    return (totals / counts).tolist()


def figure(name: str, value: float, unit: str, peer: tuple[str, float] | None = None) -> None:
    line = f"figure {name}: {value:.4f} {unit}"
    if peer is not None:
        line += f" | peer {peer[0]} {peer[1]:.4f} {unit} | ratio {value / peer[1]:.3f}x"
    print(line, flush=True)


def held_out(run_dir: str):
    run = load_run(run_dir)
    dm = AudioDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space)
    dm.prepare_shards()
    tok = run.tokenizer
    return run, dm, tok.encode_batch(dm.train_audio.clips), tok.encode_batch(dm.val_audio.clips)


def bench_mulaw(run_dir: str) -> None:
    run, dm, train_codes, val_codes = held_out(run_dir)
    result = evaluate(run_dir)
    peer = unigram_nats(train_codes, val_codes, run.tokenizer.vocab_size) / math.log(2)
    print(f"held-out: {len(dm.val_audio)} clips, {val_codes.numel()} samples at "
          f"{run.tokenizer.sample_rate} Hz")
    figure("mulaw_bits_per_sample", result.bits_per_unit, "bits/sample",
           ("independent_samples", peer))
    layout = AudioLayout.for_run(run.space, run.meta, run.tokenizer)
    start = time.perf_counter()
    sample_audio(run.model, run.tokenizer, layout, 1, 1.0, DecodingConfig(seed=0))
    seconds = time.perf_counter() - start
    figure("mulaw_generate_1s_b1", seconds, "s")
    figure("mulaw_generate_samples_per_s", run.tokenizer.sample_rate / seconds, "samples/s")


def bench_codes(run_dir: str, batch: int = 4) -> None:
    run, dm, train_codes, val_codes = held_out(run_dir)
    result = evaluate(run_dir)
    nats = result.bits_per_unit * math.log(2)  # per code token, structure tokens excluded
    peer = unigram_nats(train_codes, val_codes, run.tokenizer.codebook_size)
    print(f"held-out: {len(dm.val_audio)} clips, codes {tuple(val_codes.shape[1:])} each, "
          f"pattern {dm.layout.pattern.kind}")
    figure("codes_nll_per_code", nats, "nats", ("unigram_codes", peer))
    figure("codes_nll_reduction_vs_unigram", 100 * (1 - nats / peer), "%")
    if dm.layout.n_streams > 1:  # delay / parallel: model stream k is codebook level k
        per_level = level_nats(run, dm.val_sequences)
        for k, model_nats in enumerate(per_level):
            level_peer = unigram_nats(train_codes[:, k], val_codes[:, k],
                                      run.tokenizer.codebook_size)
            figure(f"codes_nll_level{k}", model_nats, "nats", ("unigram_codes", level_peer))
    layout = AudioLayout.for_run(run.space, run.meta, run.tokenizer)
    seconds = val_codes.shape[-1] / run.tokenizer.frame_rate
    calls = 0

    def count(*_):
        nonlocal calls
        calls += 1

    hook = run.model.register_forward_hook(count)
    start = time.perf_counter()
    sample_audio(run.model, run.tokenizer, layout, batch, seconds, DecodingConfig(seed=0))
    elapsed = time.perf_counter() - start
    hook.remove()
    print(f"generated {batch} clips of {seconds:.2f} s ({val_codes.shape[-1]} frames, "
          f"K={val_codes.shape[1]}) in {calls} model calls")
    figure(f"codes_generate_b{batch}", elapsed, "s")
    figure("codes_generate_model_calls", calls, "calls")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["mulaw", "codes"])
    parser.add_argument("--run", required=True, help="the run directory to measure")
    args = parser.parse_args()
    torch.manual_seed(0)
    {"mulaw": bench_mulaw, "codes": bench_codes}[args.what](args.run)


if __name__ == "__main__":
    main()
