"""The video domain: moving-digits clips, frame-major clip sequences, masked continuation of
clips, the GIF and strip files, the centre-of-mass figure, and a tiny end-to-end run."""

import json
import math

import pytest
import torch
from PIL import Image

from armodal.cli import RECIPES_DIR, compose_config, main
from armodal.data.images import DigitsImages
from armodal.data.video import MovingDigits
from armodal.data.video_module import VideoDataModule
from armodal.generation import DecodingConfig, generate
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.image import PixelTokenizer
from armodal.tokenizers.space import TokenSpace
from armodal.videogen import (
    centre_of_mass,
    clip_panels,
    continuation_errors,
    continue_clips,
    save_gif,
    save_strip,
)

SAMPLE = DecodingConfig(strategy="sample", temperature=1.5, seed=0)


def small_digits(**kwargs) -> MovingDigits:
    """sklearn's 8x8 digits (offline) moving in a 12x12 frame."""
    settings = {"frames": 5, "canvas": 12, "digit_size": 6, "speed": (1.0, 2.0)} | kwargs
    return MovingDigits(DigitsImages(), **settings)


def pixel_module(row_end: bool = False, canvas: int = 12, **kwargs) -> VideoDataModule:
    tok = PixelTokenizer(canvas, 1, levels=4, row_end=row_end)
    video = small_digits(canvas=canvas, digit_size=canvas // 2, **kwargs)
    return VideoDataModule(video, tok, batch_size=8)


def test_clips_are_deterministic_and_the_digit_stays_inside():
    video = small_digits()
    images = video.load_images().subset(torch.arange(20))
    a, b = video.clips(images), video.clips(images)
    assert a.frames.shape == (20, 5, 1, 12, 12) and a.frames.dtype == torch.uint8
    assert torch.equal(a.frames, b.frames) and torch.equal(a.positions, b.positions)
    frames, positions, sources = video.clip(images, 7)  # one clip alone: the same clip
    assert torch.equal(frames, a.frames[7]) and torch.equal(positions, a.positions[7])
    assert sources.tolist() == [7] and a.sources[:, 0].tolist() == list(range(20))
    assert not torch.equal(video.clips(images, "val").positions, a.positions)
    assert not torch.equal(small_digits(seed=1).clips(images).positions, a.positions)
    # Inside the frame: every pixel of the digit is drawn in every frame (nothing cropped).
    assert a.positions.min() >= 0 and a.positions.max() <= 12 - 6
    digit_mass = images.images.sum((1, 2, 3))  # (20,)
    assert torch.equal(a.frames.sum((2, 3, 4)), digit_mass[:, None].expand(20, 5))
    # Constant speed between bounces: no step is longer than the top speed (+ rounding).
    steps = (a.positions[:, 1:] - a.positions[:, :-1]).abs()
    assert steps.max() <= 3 and (steps.sum((1, 2, 3)) > 0).all()


def test_two_digits_and_bad_settings():
    video = small_digits(digits=2)
    clips = video.clips(video.load_images().subset(torch.arange(6)))
    assert clips.positions.shape == (6, 5, 2, 2) and clips.sources.shape == (6, 2)
    for kwargs, message in [({"digit_size": 12}, "1 <= digit_size < canvas"),
                            ({"speed": (1.0, 9.0)}, r"high <= 6 \(canvas - digit_size\)"),
                            ({"digits": 3}, "digits must be 1 or 2, got 3"),
                            ({"frames": 1}, "frames must be an integer >= 2")]:
        with pytest.raises(ValueError, match=message):
            small_digits(**kwargs)
    dm = VideoDataModule(small_digits(), PixelTokenizer(16, 1, levels=4), batch_size=8)
    with pytest.raises(ValueError, match=r"frames are 12x12 \(domain.video.canvas\).*16x16"):
        dm.prepare_shards()


@pytest.mark.parametrize("row_end", [False, True])
def test_pack_and_split_of_a_clip_round_trip_its_frames(row_end):
    dm = pixel_module(row_end)
    layout = dm.prepare_shards()
    tok, space = dm.tokenizer, dm.space
    per_frame = 144 + 12 * row_end
    assert dm.val_sequences.shape == (180, 1 + 5 * (per_frame + 2) + 1)
    assert dm.seq_len == dm.val_sequences.shape[1] - 1 and layout.frame_len == per_frame + 2
    clip = dm.val_clips.frames[3]  # (5, 1, 12, 12)
    streams = tok.encode_batch(clip)  # (5, S)
    # The vectorized sequences are what TokenSpace.pack writes, frame by frame.
    assert torch.equal(dm.val_sequences[3], space.pack([("image", s) for s in streams]))
    back = layout.frame_streams(dm.val_sequences[3], frames=5)
    assert torch.equal(back, streams)
    frames = torch.stack([tok.decode(s) for s in back])  # 4 grey levels: quantized pixels
    assert torch.equal(frames, torch.stack([tok.decode(s) for s in tok.encode_batch(frames)]))
    assert (frames.float() - clip.float()).abs().max() <= 255 / 3 / 2 + 1
    with pytest.raises(ValueError, match="expected 4 frames .* found 5"):
        layout.frame_streams(dm.val_sequences[3], frames=4)
    lo, hi = dm.units()[2]
    assert (hi - lo, dm.units()[:2]) == (4, (1.0, "dim"))


def tiny_model(vocab: int, seq: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2,
                                   d_model=32, max_seq_len=seq)).eval()


def test_masks_make_a_random_model_emit_well_formed_frames(tmp_path):
    dm = pixel_module(row_end=True, canvas=8, frames=4, speed=(1.0, 1.0))
    layout = dm.prepare_shards()
    tok, space = dm.tokenizer, dm.space
    model = tiny_model(space.vocab_size, dm.seq_len)
    clips = dm.val_clips.frames[:3]  # (3, 4, 1, 8, 8)
    prompt = layout.pack(tok.encode_batch(clips[:, :2].flatten(0, 1)).reshape(3, 2, -1))
    masks = layout.frame_masks(2)
    config = DecodingConfig(strategy="sample", temperature=1.5, seed=0, max_new_tokens=len(masks))
    out = generate(model, prompt, config, step_masks=masks)
    bof, eof, lo = space.special_ids["<bof>"], space.special_ids["<eof>"], space.offset("image")
    for seq in out.sequences:
        seq = torch.tensor(seq)
        assert len(seq) == 2 * layout.frame_len
        assert (seq == bof).sum() == 2 and (seq == eof).sum() == 2  # exactly 2 frames
        codes = layout.frame_streams(seq, frames=2)  # (2, 72): 8 rows of 8 codes + <eor>
        for frame in codes:
            tok.layout.from_stream(frame, "test")  # the end-of-row ids sit where they must
        assert set(seq.tolist()) - {bof, eof} <= set(range(lo, lo + tok.vocab_size))
    new = continue_clips(model, tok, layout, clips[:, :2], 2, SAMPLE)
    assert new.shape == (3, 2, 1, 8, 8) and new.dtype == torch.uint8
    with pytest.raises(ValueError, match="ask for at most 2 new frames after 2"):
        continue_clips(model, tok, layout, clips[:, :2], 3, SAMPLE)
    # The files: a strip row per clip and truth, a GIF of every frame of the clip.
    rows, frames = clip_panels(clips[:, :2], new, clips[:, 2:])
    gif = save_gif(frames, tmp_path / "clip.gif")
    png = save_strip(rows, tmp_path / "clip.png")
    cell = 8 * 8 + 4  # scaled up 8x to >= 64 px, a 2-px border each side
    grid = (3 * (cell + 2) + 2, 2 * (cell + 2) + 2 + 4)  # 3 clips x (model, truth) + time bar
    with Image.open(gif) as im:
        assert (im.n_frames, im.size) == (4, grid)
    assert Image.open(png).size == (4 * (cell + 2) + 2, 6 * (cell + 2) + 2)


def dot(row: int, col: int, size: int = 10) -> torch.Tensor:
    frame = torch.zeros(1, size, size, dtype=torch.uint8)
    frame[0, row, col] = 200
    return frame


def test_centre_of_mass_metric_on_hand_made_frames():
    two = dot(2, 3) + dot(6, 3)
    centres = centre_of_mass(torch.stack([dot(2, 7), two, torch.zeros(1, 10, 10,
                                                                         dtype=torch.uint8)]))
    assert centres.tolist() == [[2.0, 7.0], [4.0, 3.0], [4.5, 4.5]]  # blank: the centre
    # A dot moving one pixel right per frame: 3 prompt frames, 3 true ones.
    clip = torch.stack([dot(5, c) for c in range(1, 7)])[None]  # (1, 6, 1, 10, 10)
    prompt, truth = clip[:, :3], clip[:, 3:]
    errors = continuation_errors(prompt, truth.clone(), truth)
    assert errors["model"].tolist() == [0.0, 0.0, 0.0]
    assert errors["copy_last"].tolist() == [1.0, 2.0, 3.0]
    assert errors["constant_velocity"].tolist() == [0.0, 0.0, 0.0]
    # Halfway from the last centre (5, 3) to the frame's (4.5, 4.5): (4.75, 3.75).
    expected = [math.hypot(0.25, c - 3.75) for c in (4, 5, 6)]
    assert errors["halfway_to_centre"].tolist() == pytest.approx(expected)
    stuck = prompt[:, -1:].expand(1, 3, 1, 10, 10)  # a model that copies the last frame
    assert torch.equal(continuation_errors(prompt, stuck, truth)["model"],
                       errors["copy_last"])


def video_overrides(tmp, codec, steps=6):
    return ["model=tiny", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "domain.data.batch_size=8", "domain.data.val_batches=2", f"run_dir={tmp / 'run'}",
            "optim.scheduler.warmup_steps=2", f"domain.tokenizer.codec={codec}",
            "domain.video.frames=3"]


def test_recipe_trains_end_to_end_and_writes_gif_and_strip(tmp_path, tiny_codec, capsys):
    """The composed recipe on sklearn's digits with an untrained codec: train(cfg), samples at
    validation, then generate_video_files from the saved run."""
    from armodal.checkpoint import load_run
    from armodal.train import train
    from armodal.videogen import generate_video_files

    cfg = compose_config(RECIPES_DIR, "video_moving_digits", video_overrides(tmp_path,
                                                                             tiny_codec))
    cfg.domain.video.images = {"_target_": "armodal.data.images.DigitsImages"}  # no MNIST
    result = train(cfg)
    assert math.isfinite(result.metrics["val/bits_per_dim"])
    assert math.isfinite(result.metrics["val/com_error_px"])
    assert sorted((result.run_dir / "samples").glob("step_*.png"))
    run = load_run(result.run_dir)
    assert run.meta["video"] == {"frames": 3} and run.model.config.max_seq_len == 3 * 51 + 1
    paths = generate_video_files(run, {"num_clips": 2, "prompt_frames": 1,
                                       "out": str(tmp_path / "gen")},
                                 DecodingConfig(strategy="greedy"), progress=False)
    assert [p.name for p in paths] == ["continuations.gif", "continuations.png",
                                       "continuations.json"]
    with Image.open(paths[0]) as im:
        assert im.n_frames == 3  # 1 prompt frame + 2 generated
    summary = json.loads(paths[2].read_text())
    assert summary["new_frames"] == 2 and len(summary["centre_of_mass_error_px"]["model"]) == 2
    # A GIF as the prompt: its first frame, continued twice.
    again = generate_video_files(run, {"num_clips": 2, "prompt_frames": 1, "new_frames": 1,
                                       "prompt": str(paths[0]), "out": str(tmp_path / "g2")},
                                 SAMPLE, progress=False)
    assert len(again) == 3  # the GIF holds 3 frames: its second is the truth
    with pytest.raises(ValueError, match=r"video.prompt_frames=3: expected an integer in \[1, 2\]"):
        generate_video_files(run, {"prompt_frames": 3}, SAMPLE, progress=False)
    with pytest.raises(ValueError, match=r"video options \['clips'\] are unknown"):
        generate_video_files(run, {"clips": 4}, SAMPLE, progress=False)
    # The command line reaches both: generate writes the GIF / strip, eval scores the val split.
    capsys.readouterr()
    main(["generate", f"run={result.run_dir}", "video.num_clips=1", "video.prompt_frames=1",
          f"video.out={tmp_path / 'cli'}", "decoding=greedy"])
    assert "continuations.gif" in capsys.readouterr().out
    assert (tmp_path / "cli" / "continuations.png").is_file()
    main(["eval", f"run={result.run_dir}"])
    assert "bits/dim" in capsys.readouterr().out
    # The data rebuilt for a run must give the run's token space.
    assert VideoDataModule.for_run(run.meta["train_config"], run.tokenizer, run.space).space \
        .to_dict() == run.space.to_dict()
    with pytest.raises(ValueError, match="the data or the tokenizer changed since training"):
        VideoDataModule.for_run(run.meta["train_config"], run.tokenizer,
                                TokenSpace({"image": 3}, {"image": ("<bof>", "<eof>")}))
