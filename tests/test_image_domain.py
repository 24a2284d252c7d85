"""The image domain: pixel tokenizer and layout, image sequences, masked generation, guidance,
completion, exact bits per dimension, and the CLI on a tiny digits run."""

import math

import pytest
import torch
from PIL import Image

from armodal.cli import RECIPES_DIR, compose_config, main
from armodal.data.image_module import ImageDataModule, ImageLayout, image_space
from armodal.data.images import DigitsImages, ImageSet
from armodal.generation import DecodingConfig, generate
from armodal.imagegen import completion_prefix, image_step_masks, sample_images
from armodal.lit import IGNORE_INDEX, bits_per_unit, nll_sums
from armodal.model import ModelConfig, Transformer
from armodal.tokenizers import check_tokenizer
from armodal.tokenizers.image import PixelTokenizer

GREEDY = DecodingConfig(strategy="greedy")


def random_images(n, c, h, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), generator=gen, dtype=torch.uint8)


@pytest.mark.parametrize("row_end,size_tokens", [(False, False), (True, False), (True, True)])
def test_pixel_tokenizer_is_exact_at_8_bits_gray_and_rgb(row_end, size_tokens):
    gray = PixelTokenizer((5, 7), 1, 256, "gray", row_end=row_end, size_tokens=size_tokens)
    rgb = PixelTokenizer((5, 7), 3, 256, "channels", row_end=row_end, size_tokens=size_tokens)
    for tok, c in ((gray, 1), (rgb, 3)):
        images = random_images(4, c, 5, 7)
        check_tokenizer(tok, list(images))  # lossless: decode(encode(x)) == x, config round trip
        ids = tok.encode(images[0])
        assert len(ids) == 5 * 7 * c + 5 * row_end + 2 * size_tokens == tok.layout.length
        assert torch.equal(tok.encode_batch(images)[2], tok.encode(images[2]))
    # R, G, B sub-pixels in raster order: pixel (0, 1)'s green value is the 5th token.
    image = random_images(1, 3, 5, 7)[0]
    head = 2 if size_tokens else 0
    assert rgb.encode(image)[head + 4] == image[1, 0, 1]
    if size_tokens:
        assert rgb.encode(image)[:2].tolist() == [rgb.layout.size_id(5), rgb.layout.size_id(7)]


def test_digits_are_exact_at_17_levels():
    digits = DigitsImages().load()
    tok = PixelTokenizer(8, 1, levels=17)
    ids = tok.encode_batch(digits.images)
    from sklearn.datasets import load_digits

    raw = torch.from_numpy(load_digits().images).long().reshape(len(digits), -1)
    assert torch.equal(ids, raw)  # the tokens are the data's own 0..16 values
    assert torch.equal(torch.stack([tok.decode(i) for i in ids[:50]]), digits.images[:50])


def test_palette_tokenizer_fits_kmeans_colours():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [250, 250, 250]],
                           dtype=torch.uint8)
    gen = torch.Generator().manual_seed(1)
    pick = torch.randint(0, 4, (20, 6, 6), generator=gen)
    images = colours[pick].permute(0, 3, 1, 2).contiguous()  # (20, 3, 6, 6)
    tok = PixelTokenizer(6, 3, color="palette", n_colors=4)
    with pytest.raises(ValueError, match="not fitted"):
        tok.encode(images[0])
    tok.fit(images)
    assert sorted(map(tuple, tok.palette.tolist())) == sorted(map(tuple, colours.tolist()))
    for image in images[:5]:  # an image made of palette colours comes back exactly
        assert torch.equal(tok.decode(tok.encode(image)), image)
    check_tokenizer(tok, list(images[:3]))
    assert tok.dims_per_code == 3 and not tok.lossless


def test_wrong_images_and_broken_streams_are_refused():
    tok = PixelTokenizer(8, 1, levels=17, row_end=True)
    with pytest.raises(ValueError, match=r"encode: got shape \(1, 9, 8\).*H, W = \(8, 8\)"):
        tok.encode(torch.zeros(1, 9, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"got shape \(3, 8, 8\).*with C in \(1,\)"):
        tok.encode(torch.zeros(3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="got torch.float32"):
        tok.encode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="color must be"):
        PixelTokenizer(8, 1, color="rgb")
    ids = tok.encode(torch.zeros(1, 8, 8, dtype=torch.uint8))
    ids[8] = 3  # where the first end-of-row token belongs
    with pytest.raises(ValueError, match="position 8 breaks the image layout"):
        tok.decode(ids)
    with pytest.raises(ValueError, match="expects 72 ids"):
        tok.decode(ids[:-1])


def tiny_model(vocab: int, seq: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=2,
                                   d_model=32, max_seq_len=seq)).eval()


def digits_layout(tok, conditional=True) -> ImageLayout:
    classes = [str(i) for i in range(10)] if conditional else None
    return ImageLayout(image_space(tok, classes), conditional, classes)


@pytest.mark.parametrize("row_end,size_tokens", [(False, False), (True, True)])
def test_generation_emits_exactly_the_layout_even_from_a_random_model(row_end, size_tokens):
    tok = PixelTokenizer((4, 5), 1, levels=16, row_end=row_end, size_tokens=size_tokens)
    layout = digits_layout(tok)
    masks = image_step_masks(layout, tok)
    model = tiny_model(layout.space.vocab_size, 64)
    prompts = [layout.prefix(y) for y in (0, 3, 9, None)]
    config = DecodingConfig(strategy="sample", temperature=1.5, seed=0,
                            max_new_tokens=len(masks))
    out = generate(model, prompts, config, step_masks=masks)
    lo = layout.space.offset("image")
    for seq in out.sequences:
        assert len(seq) == tok.layout.length + 1 and seq[-1] == layout.space.special_ids["<eoi>"]
        codes = tok.layout.from_stream(torch.tensor(seq[:-1]) - lo, "test")  # layout holds
        assert codes.shape == (4, 5, 1) and int(codes.max()) < 16
    images = sample_images(model, tok, layout, [0, 3, None], config)
    assert images.shape == (3, 1, 4, 5) and images.dtype == torch.uint8


def test_guidance_scale_0_is_unconditional_and_1_conditional():
    tok = PixelTokenizer(4, 1, levels=8)
    layout = digits_layout(tok)
    model = tiny_model(layout.space.vocab_size, 32, seed=3)
    labels = [1, 2, 7]
    cond = sample_images(model, tok, layout, labels, GREEDY)
    uncond = sample_images(model, tok, layout, [None] * 3, GREEDY)
    scale0 = sample_images(model, tok, layout, labels, DecodingConfig(strategy="greedy",
                                                                      cfg_scale=0.0))
    assert torch.equal(scale0, uncond)
    assert not torch.equal(cond, uncond)  # the class token matters to this random model
    # A scale of 1 through the guided path (twins decoded alongside) is the conditional model.
    masks = image_step_masks(layout, tok)
    prompts = [layout.prefix(y) for y in labels]
    out = generate(model, prompts, DecodingConfig(strategy="greedy", max_new_tokens=len(masks)),
                   step_masks=masks)
    lo = layout.space.offset("image")
    assert torch.equal(torch.stack([tok.decode(torch.tensor(s[:-1]) - lo)
                                    for s in out.sequences]), cond)


def test_bad_class_requests_are_refused():
    tok = PixelTokenizer(4, 1, levels=8)
    layout = digits_layout(tok)
    model = tiny_model(layout.space.vocab_size, 32)
    with pytest.raises(ValueError, match=r"class id 10 is outside the trained classes \[0, 10\)"):
        sample_images(model, tok, layout, [10], GREEDY)
    plain = digits_layout(tok, conditional=False)
    with pytest.raises(ValueError, match="unconditional model"):
        sample_images(model, tok, plain, [3], GREEDY)
    with pytest.raises(ValueError, match="cfg_scale=2.0 needs a class-conditional"):
        sample_images(model, tok, plain, [None], DecodingConfig(cfg_scale=2.0))


def test_completion_keeps_the_given_rows():
    tok = PixelTokenizer(6, 1, levels=256, row_end=True)
    layout = digits_layout(tok)
    model = tiny_model(layout.space.vocab_size, 64)
    images = random_images(3, 1, 6, 6)
    prefix = completion_prefix(tok, images, keep_rows=2)
    assert prefix.shape == (3, 2 * 7)
    done = sample_images(model, tok, layout, [0, 1, None], DecodingConfig(seed=1), prefix)
    assert torch.equal(done[:, :, :2], images[:, :, :2])
    assert not torch.equal(done[:, :, 2:], images[:, :, 2:])
    with pytest.raises(ValueError, match="keep_rows=6"):
        completion_prefix(tok, images, keep_rows=6)


def small_digits(n=120) -> DigitsImages:
    class Few(DigitsImages):  # the first n digits: fast tests, same format
        def load(self) -> ImageSet:
            return super().load().subset(torch.arange(n))
    return Few()


def test_image_sequences_and_condition_dropout():
    tok = PixelTokenizer(8, 1, levels=17)
    dm = ImageDataModule(small_digits(), tok, batch_size=8, val_fraction=0.25,
                         conditional=True, cond_dropout=0.5, seed=0)
    dm.setup()
    space, layout = dm.space, dm.layout
    seq = dm.val_sequences[0]
    label = int(dm.val_images.labels[0])
    assert seq.shape == (1 + 1 + 1 + 64 + 2,) and dm.seq_len == 68
    assert seq[:3].tolist() == [space.bos_id, space.offset("label") + label,
                                space.special_ids["<boi>"]]
    assert seq[-2:].tolist() == [space.special_ids["<eoi>"], space.eos_id]
    assert torch.equal(tok.decode(seq[3:-2] - space.offset("image")), dm.val_images.images[0])
    null = space.offset("label") + layout.null_label
    drawn = torch.stack([dm.train_set[i % len(dm.train_set)] for i in range(2000)])
    assert 0.45 < (drawn[:, 1] == null).float().mean() < 0.55
    assert torch.equal(drawn[drawn[:, 1] != null][:, 3:], drawn[drawn[:, 1] != null][:, 3:])
    assert (torch.cat([b for b in dm.val_dataloader()])[:, 1] != null).all()  # val: true class
    unlabelled = ImageDataModule(small_digits(), tok, batch_size=8, conditional=True)
    unlabelled.images.load = lambda: ImageSet(DigitsImages().load().images[:40], None, None, "x")
    with pytest.raises(ValueError, match="needs class labels"):
        unlabelled.prepare_shards()


def test_bits_per_dim_matches_a_hand_computation():
    """val/bits_per_dim counts only the code targets, each one dimension, in bits."""
    import lightning as L

    from armodal.lit import ARModule

    tok = PixelTokenizer(8, 1, levels=17)
    dm = ImageDataModule(small_digits(), tok, batch_size=16, val_fraction=0.25,
                         conditional=True, seed=0)
    dm.prepare_shards()
    units_per_token, unit, unit_ids = dm.units()
    model_config = ModelConfig(vocab_size=dm.space.vocab_size, n_layer=1, n_head=2, n_kv_head=2,
                               d_model=16, max_seq_len=dm.seq_len)
    torch.manual_seed(0)
    module = ARModule(model_config, optimizer=torch.optim.AdamW, pad_id=dm.space.pad_id,
                      units_per_token=units_per_token, unit=unit, unit_ids=unit_ids)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    logged = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/bits_per_dim"]
    # By hand: -log2 p(code) at the 64 code positions of each val image, over 64 dims each.
    seqs = dm.val_sequences
    with torch.no_grad():
        logp = module.model(seqs[:, :-1]).log_softmax(-1)  # (N, L-1, V)
    code_positions = range(3, 3 + 64)  # targets: seq[3 .. 66] are the codes
    total = sum(-logp[n, t - 1, seqs[n, t]].item() for n in range(len(seqs))
                for t in code_positions)
    assert logged == pytest.approx(total / math.log(2) / (len(seqs) * 64), rel=1e-5)
    # nll_sums on a hand-made case: targets outside [lo, hi) and ignored ones are left out.
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0])
    targets = torch.tensor([5, 10, IGNORE_INDEX, 11])
    sums = nll_sums(nll, targets, (10, 12))
    assert sums.tolist() == [7.0, 3.0, 6.0, 2.0]
    assert bits_per_unit(*sums, 3.0, (10, 12)) == pytest.approx(6.0 / 6 / math.log(2))


def quick_image_overrides(tmp, steps=20):
    return ["model=tiny", f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
            "domain.data.batch_size=32", f"run_dir={tmp / 'run'}", "optim.scheduler.warmup_steps=5"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from armodal.train import train

    tmp = tmp_path_factory.mktemp("digits_run")
    cfg = compose_config(RECIPES_DIR, "image_digits_pixels", quick_image_overrides(tmp))
    return train(cfg)


def test_digits_recipe_trains_and_samples_each_validation(digits_run):
    run_dir = digits_run.run_dir
    assert math.isfinite(digits_run.metrics["val/bits_per_dim"])
    pngs = sorted((run_dir / "samples").glob("step_*.png"))
    assert pngs, "no sample grid was written at validation"
    # One image per class, each 8x8 scaled up 8x to 64 px, with 2 px padding.
    assert Image.open(pngs[-1]).size == (10 * 66 + 2, 66 + 2)


def test_cli_generate_eval_and_completion(digits_run, tmp_path, capsys):
    run = digits_run.run_dir
    out = tmp_path / "grid.png"
    main(["generate", f"run={run}", "image.classes=[1,2]", "image.num_images=3",
          f"image.out={out}", "decoding.cfg_scale=2"])
    assert "wrote" in capsys.readouterr().out
    assert Image.open(out).size == (3 * 66 + 2, 2 * 66 + 2)  # a row per class
    main(["generate", f"run={run}", "image.num_images=4", "image.complete_rows=4",
          f"image.out={tmp_path / 'done.png'}"])
    assert Image.open(tmp_path / "done.png").size == (4 * 66 + 2, 3 * 66 + 2)
    capsys.readouterr()
    main(["eval", f"run={run}"])
    line = capsys.readouterr().out.splitlines()[0]
    assert "bits/dim" in line
    bits = float(line.split(",")[-1].split()[0])
    assert bits == pytest.approx(digits_run.metrics["val/bits_per_dim"], rel=1e-4)


@pytest.mark.parametrize("args,message", [
    (["image.classes=[12]"], "class id 12 is outside the trained classes"),
    (["prompt=hello"], "is an image run: it takes no prompt"),
    (["image.complete_rows=8"], "keep_rows=8"),
])
def test_cli_generate_refuses_bad_image_requests(digits_run, args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", f"run={digits_run.run_dir}", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_vq_tokenizer_round_trip_keeps_the_shape(tiny_codec):
    from armodal.tokenizers.base import tokenizer_from_config
    from armodal.tokenizers.image import VQTokenizer

    tok = VQTokenizer(str(tiny_codec), row_end=True)
    images = random_images(5, 1, 28, 28)
    ids = tok.encode_batch(images)  # (5, 7 rows x (7 codes + end of row))
    assert ids.shape == (5, 56) and tok.vocab_size == 17 and tok.dims_per_code == 16
    assert torch.equal(ids[1], tok.encode(images[1]))
    back = torch.stack([tok.decode(i) for i in ids])
    assert back.shape == images.shape and back.dtype == torch.uint8
    assert torch.equal(tok.encode_batch(back), tok.encode_batch(back))  # deterministic
    check_tokenizer(tok, list(images[:2]))
    with pytest.raises(ValueError, match=r"got shape \(1, 32, 32\).*H, W = \(28, 28\)"):
        tok.encode(torch.zeros(1, 32, 32, dtype=torch.uint8))
    # A run records the codec's weights hash: another codec under that path is refused.
    cfg = tok.config()
    cfg["state"]["codec_sha256"] = "0" * 64
    with pytest.raises(ValueError, match="trained on codes of a codec with 000000000000"):
        tokenizer_from_config(cfg)


def test_vq_image_sequences_count_each_code_as_a_patch(tiny_codec):
    from armodal.tokenizers.image import VQTokenizer

    class Mnistish(DigitsImages):  # digits at MNIST size, so no MNIST files are needed
        def load(self) -> ImageSet:
            return DigitsImages(size=28).load().subset(torch.arange(64))

    dm = ImageDataModule(Mnistish(), VQTokenizer(str(tiny_codec)), batch_size=8,
                         conditional=True)
    dm.setup()
    assert dm.train_sequences.shape[1] == 3 + 49 + 2
    units_per_token, unit, (lo, hi) = dm.units()
    assert (units_per_token, unit, hi - lo) == (16.0, "dim", 16)


def test_samples_are_logged_to_wandb_as_images(tmp_path, monkeypatch):
    """logger=wandb (offline, no account): each validation's grid lands as a wandb image."""
    from armodal.train import train

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    cfg = compose_config(RECIPES_DIR, "image_digits_pixels",
                         [*quick_image_overrides(tmp_path, steps=4), "logger=wandb"])
    train(cfg)
    logged = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/*.png"))
    assert logged, "no sample image reached wandb"


def test_image_folder_with_a_palette_fitted_on_the_train_split(tmp_path):
    from armodal.data.images import ImageFolderImages

    colours = [(255, 0, 0), (0, 200, 0), (0, 0, 255), (240, 240, 240)]
    gen = torch.Generator().manual_seed(0)
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(6):
            pick = torch.randint(0, 4, (12, 12), generator=gen)
            pixels = torch.tensor(colours, dtype=torch.uint8)[pick].numpy()
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    tok = PixelTokenizer(8, 3, color="palette", n_colors=4)
    dm = ImageDataModule(ImageFolderImages(str(tmp_path), size=8), tok, batch_size=4,
                         val_fraction=0.25, conditional=True)
    dm.setup()
    assert tok.is_fitted and dm.layout.classes == ["cats", "dogs"]
    assert dm.train_sequences.shape == (9, 3 + 64 + 2) and dm.units()[0] == 3.0
    grid = sample_images(tiny_model(dm.space.vocab_size, dm.seq_len), tok, dm.layout, [0, 1],
                         GREEDY)
    assert grid.shape == (2, 3, 8, 8)
