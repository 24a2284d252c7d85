"""Video domain figures: held-out nats per code by frame, and where generated digits go.

    python bench/video.py --run <video_moving_digits run dir> [--clips 200] [--prompt-frames 3]

nats per code: the run's exact NLL of the code targets of its held-out clips, for the first
    frame (nothing to go on but the data) and for the later frames (the previous frames in
    context), against a unigram of the codes fitted on the train clips (the peer).
centre-of-mass error: the first --clips held-out clips keep their first --prompt-frames
    frames, the model generates the rest (greedy, and sampled at temperature 0.8, KV cache);
    per new frame, the mean distance in pixels between the generated frame's centre of mass
    and the true frame's, against three peers that see the same prompt: holding the last
    prompt frame (copy_last), moving its centre on at the prompt's last step
    (constant_velocity), and halfway from it to the frame's centre (halfway_to_centre).
"""

from __future__ import annotations

import argparse
import time

import torch

from armodal.checkpoint import load_run
from armodal.data.video_module import VideoDataModule, VideoLayout, tokenize_clips
from armodal.generation import DecodingConfig
from armodal.videogen import continuation_errors, continue_clips


@torch.inference_mode()
def frame_nats(run, layout: VideoLayout, sequences: torch.Tensor,
               batch_size: int = 32) -> torch.Tensor:
    """(F,) mean NLL (nats) of the code targets of each frame over val sequences (N, L)."""
    lo = run.space.offset("image")
    totals = torch.zeros(layout.frames, dtype=torch.float64)
    counts = torch.zeros_like(totals)
    # Target position p (1-based in the sequence) belongs to frame (p - 1) // frame_len.
    frame_of = (torch.arange(1, sequences.shape[1]) - 1) // layout.frame_len  # (L-1,)
    for batch in sequences.split(batch_size):
        logits = run.model(batch[:, :-1]).float()  # (B, L-1, V)
        targets = batch[:, 1:]  # (B, L-1)
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets,
                                                reduction="none")  # (B, L-1)
        is_code = (targets >= lo) & (targets < lo + layout.n_codes)
        frames = frame_of.clamp_max(layout.frames - 1).expand_as(targets)
        totals.index_add_(0, frames[is_code], nll[is_code].double())
        counts.index_add_(0, frames[is_code], torch.ones_like(nll[is_code], dtype=torch.float64))
    return totals / counts


def unigram_nats(train: torch.Tensor, val: torch.Tensor, size: int, alpha: float = 0.5) -> float:
    """Mean NLL (nats) of val codes under one categorical fitted on train codes (add-alpha)."""
    counts = torch.bincount(train.flatten(), minlength=size).double() + alpha
    return -float((counts / counts.sum()).log()[val.flatten()].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--clips", type=int, default=200)
    parser.add_argument("--prompt-frames", type=int, default=3)
    args = parser.parse_args()

    run = load_run(args.run)
    dm = VideoDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space)
    layout = dm.prepare_shards()
    tok = run.tokenizer

    start = time.perf_counter()
    per_frame = frame_nats(run, layout, dm.val_sequences)
    train_codes = tokenize_clips(tok, dm.video.clips(dm.train_images, "train"))
    val_codes = tokenize_clips(tok, dm.val_clips)
    peer = unigram_nats(train_codes, val_codes, layout.n_codes)
    later = float(per_frame[1:].mean())
    print(f"held-out nats per code by frame: {[round(float(x), 3) for x in per_frame]} "
          f"({len(dm.val_clips)} clips, {time.perf_counter() - start:.0f} s)")
    print(f"figure video_nats_per_code_first_frame: {float(per_frame[0]):.3f} nats | peer "
          f"unigram {peer:.3f} nats | ratio {float(per_frame[0]) / peer:.3f}")
    print(f"figure video_nats_per_code_later_frames: {later:.3f} nats | peer unigram "
          f"{peer:.3f} nats | ratio {later / peer:.3f}")

    clips = dm.val_clips.frames[:args.clips]  # (N, F, C, H, W)
    k = args.prompt_frames
    prompt, truth = clips[:, :k], clips[:, k:]
    for name, decoding in [("greedy", DecodingConfig(strategy="greedy")),
                           ("sample", DecodingConfig(strategy="sample", temperature=0.8,
                                                     seed=0))]:
        start = time.perf_counter()
        generated = continue_clips(run.model, tok, layout, prompt, truth.shape[1], decoding)
        seconds = time.perf_counter() - start
        errors = continuation_errors(prompt, generated, truth)
        print(f"{name}: {len(clips)} clips, {k} prompt frames, {truth.shape[1]} new, "
              f"{seconds:.0f} s; error per new frame (px): "
              + "; ".join(f"{peer} {[round(float(e), 2) for e in errs]}"
                          for peer, errs in errors.items()))
        model = float(errors["model"].mean())
        for peer, suffix in (("copy_last", ""), ("constant_velocity", "_vs_velocity"),
                             ("halfway_to_centre", "_vs_halfway")):
            other = float(errors[peer].mean())
            print(f"figure video_com_error_{name}{suffix}: {model:.2f} px | peer {peer} "
                  f"{other:.2f} px | ratio {model / other:.3f}")


if __name__ == "__main__":
    main()
