"""Mixed-modality sequences: one token space across modalities, mixed and paired data,
per-modality metrics, cross-modal generation and its command line."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from armodal.cli import RECIPES_DIR, compose_config, main
from armodal.crossmodal import next_segment, segment_masks, segment_prompt
from armodal.data.images import DigitsImages
from armodal.data.multimodal_module import MixtureDataset, MixturePart, MultimodalDataModule
from armodal.data.paired import DigitCaptions, caption_digit
from armodal.generation import DecodingConfig
from armodal.lit import IGNORE_INDEX
from armodal.modality_metrics import ModalityGroups
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers.audio import CodecTokenizer, MuLawTokenizer
from armodal.tokenizers.base import check_tokenizer, tokenizer_from_config
from armodal.tokenizers.image import PixelTokenizer
from armodal.tokenizers.multimodal import MultimodalTokenizer
from armodal.tokenizers.text import ByteTokenizer


@pytest.fixture(scope="module")
def digits():
    return DigitsImages().load()


def make_tokenizer() -> MultimodalTokenizer:
    return MultimodalTokenizer({"image": PixelTokenizer(8, levels=17), "text": ByteTokenizer(),
                                "audio": MuLawTokenizer(8000, bits=4)})


def random_sample(rng: random.Random, digits) -> list:
    segments = []
    for _ in range(rng.randint(0, 5)):
        kind = rng.choice(["image", "text", "audio"])
        if kind == "image":
            segments.append(("image", digits.images[rng.randrange(len(digits))]))
        elif kind == "text":
            segments.append(("text", "".join(rng.choice("ab cé7\n") for _ in range(rng.randint(0, 9)))))
        else:
            segments.append(("audio", torch.rand(rng.randint(1, 20), generator=torch.Generator().manual_seed(rng.randrange(99))) * 2 - 1))
    return segments


def test_pack_and_split_are_inverse_on_random_mixed_samples(digits):
    tok = make_tokenizer()
    rng = random.Random(0)
    for _ in range(200):
        sample = random_sample(rng, digits)
        ids = tok.encode(sample)
        assert ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size)
        # split gives back each segment's modality and exactly its tokenizer's local ids.
        s = tok.space
        back = s.split([s.bos_id, *ids.tolist(), s.eos_id])
        assert [m for m, _ in back] == [m for m, _ in sample]
        for (m, content), (_, local) in zip(sample, back):
            assert torch.equal(local, tok.parts[m].encode(content))
        decoded = tok.decode(ids)  # and the lossless parts decode to the content itself
        for (m, want), (_, got) in zip(sample, decoded):
            if m != "audio":
                assert torch.equal(got, want) if m == "image" else got == want
        # Batched encoding is the same as one sample at a time.
        assert torch.equal(tok.encode_many([sample])[0], ids)


def test_clips_of_many_lengths_encode_in_batches_as_one_at_a_time(tiny_audio_codec):
    """An audio codec batches clips of different lengths (zero-padded, its convs are causal):
    the codes of each equal its own encode(), so encode_many equals encode per sample."""
    codec = CodecTokenizer(str(tiny_audio_codec), n_q=1)  # hop 20
    gen = torch.Generator().manual_seed(0)
    lengths = [1, 19, 20, 21, 410, 800, 57, 20, 333, 799]
    clips = [torch.rand(n, generator=gen) * 2 - 1 for n in lengths]
    batched = codec.encode_clips(clips, batch_size=3)
    for clip, codes in zip(clips, batched):
        assert torch.equal(codes, codec.encode(clip))
    assert [c.shape[-1] for c in batched] == [-(-n // 20) for n in lengths]
    tok = MultimodalTokenizer({"audio": codec, "text": ByteTokenizer()})
    samples = [[("audio", clip), ("text", f"clip {i}")] for i, clip in enumerate(clips)]
    assert all(torch.equal(a, b) for a, b in
               zip(tok.encode_many(samples), [tok.encode(s) for s in samples]))


def test_encode_many_encodes_each_distinct_content_once(tiny_audio_codec, digits):
    """The two reading orders of a pair hold the same image or clip (the same object, or an
    equal copy): each distinct content reaches its tokenizer once, and the ids are unchanged."""
    codec = CodecTokenizer(str(tiny_audio_codec), n_q=1)
    seen = []
    encode_clips = codec.encode_clips
    codec.encode_clips = lambda clips: seen.extend(clips) or encode_clips(clips)
    tok = MultimodalTokenizer({"audio": codec, "image": PixelTokenizer(8, levels=17),
                               "text": ByteTokenizer()})
    gen = torch.Generator().manual_seed(1)
    clips = [torch.rand(n, generator=gen) - 0.5 for n in (40, 41, 40)]
    samples = [[("audio", c), ("text", "x"), ("image", digits.images[i])]
               for i, c in enumerate(clips)]
    samples += [[("image", digits.images[i].clone()), ("audio", c.clone())]  # equal copies
                for i, c in enumerate(clips)]
    samples += [[("audio", clips[0].double())], [("audio", torch.zeros(40))],
                [("audio", -torch.zeros(40))]]
    assert all(torch.equal(a, b) for a, b in
               zip(tok.encode_many(samples), [tok.encode(s) for s in samples]))
    # 3 clips, the float64 copy of the first (another dtype), 0.0 and -0.0 (equal values,
    # other bytes: encoded apart, which is only slower)
    assert len(seen) == 6


def test_the_multimodal_tokenizer_passes_the_conformance_check_and_round_trips_its_config(digits):
    tok = make_tokenizer()
    sample = [("text", "a seven"), ("image", digits.images[7]), ("audio", torch.zeros(5))]
    check_tokenizer(tok, [sample, [("text", "")], []])
    rebuilt = tokenizer_from_config(json.loads(json.dumps(tok.config())))
    assert rebuilt.space.to_dict() == tok.space.to_dict()


def test_bad_segments_are_refused_by_name():
    tok = make_tokenizer()
    with pytest.raises(ValueError, match="no 'action' tokenizer; its modalities: image, text, audio"):
        tok.encode([("action", torch.zeros(10))])
    with pytest.raises(ValueError, match="segment 0 must be a"):
        tok.encode(["text"])
    with pytest.raises(ValueError, match="list of .modality, content. segments"):
        tok.encode("hello")
    with pytest.raises(ValueError, match="key each tokenizer by its own modality"):
        MultimodalTokenizer({"image": ByteTokenizer()})


def test_segment_masks_allow_exactly_the_active_modality_and_its_end_marker():
    tok = make_tokenizer()
    s = tok.space
    steps, allowed, length = segment_masks(tok, "text")
    assert steps is None and length is None
    expected = s.modality_mask("text")
    expected[s.special_ids["<eot>"]] = True
    assert torch.equal(allowed, expected)
    steps, allowed, length = segment_masks(tok, "image")
    assert allowed is None and length == 64 and steps.shape == (65, s.vocab_size)
    for step in steps[:-1]:
        assert torch.equal(step, s.modality_mask("image"))
    assert steps[-1].nonzero().flatten().tolist() == [s.special_ids["<eoi>"]]


def tiny_model(tok, seq: int = 128, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, d_model=32,
                         max_seq_len=seq)
    return Transformer(config).eval()


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_a_random_model_gives_well_formed_next_segments(digits, cfg_scale):
    tok = make_tokenizer()
    model = tiny_model(tok)
    decoding = DecodingConfig(max_new_tokens=12, seed=3, cfg_scale=cfg_scale)
    prompts = [[("image", digits.images[0])], [("text", "hi"), ("audio", torch.zeros(4))]]
    texts = next_segment(model, tok, prompts, "text", decoding)
    text_lo = tok.space.offset("text")
    for content, local in texts:
        assert isinstance(content, str) and len(local) <= 12
        assert all(0 <= i < 256 for i in local)
    images = next_segment(model, tok, [[("text", "a handwritten seven")]] * 3, "image", decoding)
    for content, local in images:
        assert content.shape == (1, 8, 8) and content.dtype == torch.uint8 and len(local) == 64
    # Seeded rows of one request differ from each other, and a rerun repeats them.
    assert images[0][1] != images[1][1]
    again = next_segment(model, tok, [[("text", "a handwritten seven")]] * 3, "image", decoding)
    assert [r[1] for r in again] == [r[1] for r in images]
    assert text_lo > 0


def test_cross_modal_prompts_that_cannot_work_raise_clearly(digits):
    tok = make_tokenizer()
    model = tiny_model(tok, seq=70)
    with pytest.raises(ValueError, match="no 'video' tokenizer"):
        next_segment(model, tok, [[("text", "x")]], "video", DecodingConfig())
    with pytest.raises(ValueError, match="prompt segment 0 is 'video'"):
        next_segment(model, tok, [[("video", torch.zeros(3))]], "text", DecodingConfig())
    with pytest.raises(ValueError, match="does not fit the model's context of 70"):
        next_segment(model, tok, [[("text", "a handwritten seven")]], "image", DecodingConfig())


def test_the_unconditional_prompt_empties_the_condition_but_keeps_its_markers(digits):
    tok = make_tokenizer()
    s = tok.space
    ids = segment_prompt(tok, [("text", "seven")], "image", empty=True)
    assert ids == [s.bos_id, s.special_ids["<bot>"], s.special_ids["<eot>"],
                   s.special_ids["<boi>"]]


def test_per_modality_metrics_sum_to_the_total_loss_by_token_counts():
    tok = make_tokenizer()
    groups = ModalityGroups.from_space(tok.space)
    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, tok.vocab_size, (500,), generator=g)
    targets[::7] = IGNORE_INDEX
    nll = torch.rand(500, generator=g) * 5
    nll[targets == IGNORE_INDEX] = 0
    sums = groups.sums(nll, targets)
    learned = targets != IGNORE_INDEX
    assert sums[:, 1].sum().item() == learned.sum().item()
    metrics = groups.metrics(sums)
    total = sum(metrics[f"val/loss_{n}"] * c for n, c in zip(groups.names, sums[:, 1].tolist())
                if c > 0)
    assert total / learned.sum().item() == pytest.approx(nll[learned].mean().item(), rel=1e-6)
    # Weights 1: the plain mean. Text weighted 0: the mean over the other groups only.
    assert groups.weighted_loss(nll, targets).item() == pytest.approx(nll[learned].mean().item())
    heavy = ModalityGroups.from_space(tok.space, {"text": 0.0})
    keep = learned & (heavy.groups_of(targets) != groups.names.index("text"))
    assert heavy.weighted_loss(nll, targets).item() == pytest.approx(nll[keep].mean().item())
    with pytest.raises(ValueError, match="loss_weights names \\['txt'\\]"):
        ModalityGroups.from_space(tok.space, {"txt": 1.0})


def test_the_mixture_follows_its_ratios_and_drops_conditions_at_its_rate():
    a = torch.zeros(10, 4, dtype=torch.int64)
    b = torch.ones(30, 4, dtype=torch.int64)
    b_uncond = torch.full((30, 4), 2)
    data = MixtureDataset([a, b], [None, b_uncond], [0.25, 0.75], [0.0, 0.2], 400, seed=1)
    parts = data.table[:, 0]
    assert (parts == 0).sum().item() == 100 and (parts == 1).sum().item() == 300
    # Each part is cycled through a permutation: every row is used equally often.
    assert torch.bincount(data.table[parts == 0, 1]).tolist() == [10] * 10
    torch.manual_seed(0)
    items = torch.stack([data[i][0] for i in range(len(data))])
    assert (items[parts == 0] == 0).all()
    dropped = (items[parts == 1] == 2).float().mean().item()
    assert 0.13 < dropped < 0.27
    again = MixtureDataset([a, b], [None, b_uncond], [0.25, 0.75], [0.0, 0.2], 400, seed=1)
    assert torch.equal(again.table, data.table)


def test_the_data_module_pairs_both_orders_and_drops_captions_for_guidance():
    tok = MultimodalTokenizer({"image": PixelTokenizer(8, levels=17), "text": ByteTokenizer()})
    images = DigitsImages()
    dm = MultimodalDataModule({
        "i2t": MixturePart(DigitCaptions(images, "image_text", val_fraction=0.2)),
        "t2i": MixturePart(DigitCaptions(images, "text_image", val_fraction=0.2), cond_dropout=0.5),
    }, tok, batch_size=8, seed=0)
    space = dm.prepare_shards()
    first = tok.decode(dm.train_parts["i2t"][0])
    assert [m for m, _ in first] == ["image", "text"]
    assert caption_digit(first[1][1]) == int(images.load().labels[0])
    flipped = tok.decode(dm.train_parts["t2i"][0])
    assert [m for m, _ in flipped] == ["text", "image"] and flipped[0][1] == first[1][1]
    uncond = dm.uncond_parts["t2i"][0]
    assert uncond[:3].tolist() == [space.bos_id, space.special_ids["<bot>"],
                                   space.special_ids["<eot>"]]
    assert tok.decode(uncond)[0] == ("text", "")
    assert dm.seq_len == dm.train_parts["i2t"].shape[1] - 1
    pads = dm.train_parts["i2t"] == space.pad_id
    assert pads.any() and not pads[:, 0].any()


def test_caption_digit_reads_words_and_numerals():
    assert caption_digit("a handwritten seven") == 7
    assert caption_digit("handwritten 3.") == 3
    assert caption_digit("a seven or a 3") is None
    assert caption_digit("a handwritten sevn") is None


@pytest.fixture(scope="module")
def captions_run(tmp_path_factory):
    from armodal.train import train

    tmp = tmp_path_factory.mktemp("captions")
    cfg = compose_config(RECIPES_DIR, "multimodal_digits_captions", [
        "domain=multimodal_digits_pixels", "model=tiny", "trainer.max_steps=12",
        "trainer.val_check_interval=12", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "domain.data.batch_size=16",
        "domain.data.val_batches=2", "optim.scheduler.warmup_steps=2", f"run_dir={tmp / 'run'}",
        "decoding.max_new_tokens=24"])
    return train(cfg)


def test_a_captions_run_reports_each_modality_and_samples_both_directions(captions_run):
    m = captions_run.metrics
    for key in ("val/loss_image", "val/loss_text", "val/loss_structure",
                "val/bits_per_dim_image", "val/bits_per_byte_text"):
        assert math.isfinite(m[key]), key
    samples = captions_run.run_dir / "samples"
    assert "image_to_text" in (samples / "samples.txt").read_text()
    grid = sorted(samples.glob("step_*_text_to_image.png"))
    assert grid and Image.open(grid[-1]).size[0] > 8


def test_cli_generates_across_modalities_and_evaluates_both_directions(captions_run, tmp_path,
                                                                       digits, capsys):
    run = captions_run.run_dir
    png = tmp_path / "digit.png"
    Image.fromarray(digits.images[5, 0].numpy()).save(png)
    main(["generate", f"run={run}", f"prompt_image={png}", "multimodal.next=text",
          "decoding=greedy", "decoding.max_new_tokens=10"])
    assert capsys.readouterr().out.strip() != ""
    out = tmp_path / "drawn"
    main(["generate", f"run={run}", "prompt=a handwritten seven", "multimodal.next=image",
          "multimodal.num_samples=3", f"multimodal.out={out}", "decoding.cfg_scale=2"])
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out.with_suffix(".png")).size == (3 * 66 + 2, 66 + 2)
    main(["eval", f"run={run}", "digits.images=20", "digits.per_class=2",
          "digits.temperature=0.8"])
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["captioned_images"] == 20 and result["generated_images"] == 20
    assert result["temperature"] == 0.8 and "temperature 0.8)" in "\n".join(lines)
    assert 0 <= result["image_to_text_accuracy"] <= 1
    assert (run / "eval" / "text_to_image.png").is_file()


def test_prompt_audio_is_read_as_the_audio_domains_read_files(tmp_path):
    """Mixed to mono, resampled to the tokenizer's rate (a co-prime rate directly, not through
    a kernel of gigabytes); an unreadable file or a rate out of range is one clear error."""
    import types

    import soundfile as sf

    from armodal.crossmodal_io import read_audio

    at_16k = types.SimpleNamespace(sample_rate=16000)
    stereo = tmp_path / "stereo.wav"
    left = torch.linspace(-0.5, 0.5, 800)
    sf.write(stereo, torch.stack([left, -left], 1).numpy(), 8000)
    wave = read_audio(str(stereo), at_16k)
    assert wave.shape == (1600,) and wave.abs().max() < 1e-3  # the two channels cancel
    co_prime = tmp_path / "co_prime.wav"
    sf.write(co_prime, left.numpy(), 204609)
    assert read_audio(str(co_prime), at_16k).shape == (63,)  # ceil(800 * 16000 / 204609)
    damaged = tmp_path / "damaged.wav"
    sf.write(damaged, left.numpy(), 500)
    with pytest.raises(ValueError, match=r"prompt_audio=.*damaged.wav.*500 Hz"):
        read_audio(str(damaged), at_16k)
    (tmp_path / "not_audio.wav").write_text("hello")
    with pytest.raises(ValueError, match=r"prompt_audio=.*cannot be read as audio"):
        read_audio(str(tmp_path / "not_audio.wav"), at_16k)


def test_cli_refuses_unreadable_or_unknown_segments(captions_run, tmp_path, capsys):
    run = captions_run.run_dir
    bad = tmp_path / "not_an_image.png"
    bad.write_text("hello")
    with pytest.raises(SystemExit):
        main(["generate", f"run={run}", f"prompt_image={bad}", "multimodal.next=text"])
    assert "cannot be read as an image" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", f"run={run}", "prompt=x", "multimodal.next=audio"])
    assert "no 'audio' tokenizer" in capsys.readouterr().err


def fake_speech_corpus(tmp_path, n: int = 24):
    """A SpeechCorpus whose cache already holds n short synthetic 'utterances' (a tone per
    word at 1 kHz), so the speech <-> text path runs without espeak-ng."""
    import hashlib

    import numpy as np
    import soundfile as sf

    from armodal.data.paired import DIGIT_WORDS
    from armodal.data.speech import SpeechCorpus

    corpus = SpeechCorpus(n_utterances=n, sample_rate=1000, cache_dir=str(tmp_path / "speech"),
                          vocabulary=list(DIGIT_WORDS[:3]), min_words=1, max_words=2)
    key = hashlib.sha256(json.dumps(corpus.settings(), sort_keys=True).encode()).hexdigest()[:20]
    directory = tmp_path / "speech" / key
    directory.mkdir(parents=True)
    rng = random.Random(0)
    utterances = []
    for i in range(n):
        words = [rng.randrange(3) for _ in range(rng.randint(1, 2))]
        t = np.arange(60) / 1000
        wave = np.concatenate([0.5 * np.sin(2 * np.pi * (100 + 100 * w) * t) for w in words])
        sf.write(directory / f"{i:05d}.wav", np.concatenate([wave, np.zeros(100)]), 1000)
        text = " ".join(DIGIT_WORDS[w] for w in words).capitalize() + "."
        utterances.append({"file": f"{i:05d}.wav", "text": text})
    (directory / "meta.json").write_text(json.dumps({"utterances": utterances}))
    return corpus


def test_speech_transcripts_trim_silence_and_hold_out_whole_utterances(tmp_path):
    from armodal.data.paired import SpeechTranscripts

    corpus = fake_speech_corpus(tmp_path)
    assert corpus.directory().is_dir()  # the fake cache is found, nothing is built
    train, val = SpeechTranscripts(corpus, "text_audio", val_fraction=0.25).split_samples()
    assert len(train) == 18 and len(val) == 6
    (m0, text), (m1, wave) = val[0]
    assert (m0, m1) == ("text", "audio") and text.endswith(".")
    words = len(text.split())
    # The 100 silent samples are trimmed to the 50 ms (50 samples) of tail kept.
    assert 60 * words + 45 <= len(wave) <= 60 * words + 50


def test_a_speech_run_trains_and_reports_cer_both_ways(tmp_path, capsys):
    from armodal.train import train

    corpus = fake_speech_corpus(tmp_path)
    cfg = compose_config(RECIPES_DIR, "multimodal_speech_text", [
        f"+domain.corpus.cache_dir={corpus.cache_dir}", "domain.corpus.n_utterances=24",
        "domain.corpus.sample_rate=1000", "domain.corpus.vocabulary=[zero,one,two]",
        "domain.corpus.min_words=1", "domain.corpus.max_words=2",
        "model=tiny", "trainer.max_steps=6", "trainer.val_check_interval=6",
        "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "domain.data.batch_size=8", "optim.scheduler.warmup_steps=2",
        f"run_dir={tmp_path / 'run'}", "decoding.max_new_tokens=12"])
    with open_dict(cfg):  # mu-law at 1 kHz instead of a trained codec
        cfg.domain.tokenizer.tokenizers.audio = {
            "_target_": "armodal.tokenizers.audio.MuLawTokenizer", "sample_rate": 1000, "bits": 4}
    result = train(cfg)
    assert math.isfinite(result.metrics["val/loss_audio"])
    assert math.isfinite(result.metrics["val/loss_text"])
    # each validation's samples: two spoken transcripts as WAVs, transcripts beside the truth
    spoken = sorted(p.name for p in (result.run_dir / "samples").glob("*.wav"))
    assert spoken == ["step_000006_text_to_speech_0.wav", "step_000006_text_to_speech_1.wav"]
    assert "speech_to_text" in (result.run_dir / "samples" / "samples.txt").read_text()
    capsys.readouterr()
    main(["eval", f"run={result.run_dir}", "speech.utterances=2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["utterances"] == 2 and out["speech_to_text_cer"] >= 0
    assert (result.run_dir / "eval" / "text_to_speech_0.wav").is_file()


def test_character_error_rate_counts_edits_over_reference_length():
    from armodal.crossmodal_eval import character_error_rate

    assert character_error_rate(["Seven six."], ["seven six"]) == 0
    assert character_error_rate(["sevn"], ["seven"]) == pytest.approx(1 / 5)
    assert character_error_rate(["", "ab"], ["abcd", "ab"]) == pytest.approx(4 / 6)


def test_single_modality_corpora_interleave_with_pairs_by_ratio(tmp_path):
    from armodal.data.paired import TextSamples
    from armodal.data.sources import TextSource

    (tmp_path / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40)
    tok = MultimodalTokenizer({"image": PixelTokenizer(8, levels=17), "text": ByteTokenizer()})
    images = DigitsImages()
    dm = MultimodalDataModule({
        "pairs": MixturePart(DigitCaptions(images, "image_text", val_fraction=0.2), ratio=2),
        "images": MixturePart(DigitCaptions(images, "image", val_fraction=0.2), ratio=1),
        "text": MixturePart(TextSamples(TextSource(str(tmp_path / "a.txt")), chars=32), ratio=1),
    }, tok, batch_size=8, epoch_size=400, seed=0)
    dm.prepare_shards()
    dm.setup()
    kinds = []
    for i in range(len(dm.train_set)):
        kinds.append(tuple(m for m, _ in tok.decode(dm.train_set[i])))
    assert kinds.count(("image", "text")) == 200
    assert kinds.count(("image",)) == 100 and kinds.count(("text",)) == 100
    text = next(c for c in map(tok.decode, dm.train_parts["text"]) if c)[0][1]
    assert 0 < len(text) <= 32 and text in (tmp_path / "a.txt").read_text()
