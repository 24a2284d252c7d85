"""`armodal eval` for mixed-modality runs: both directions of the same model, measured.

Digit captions (multimodal_digits_captions):

- image -> text: greedy captions of the held-out images; a caption is right when it names the
  image's digit (by word or numeral) and no other.
- text -> image: "a handwritten <word>" prompts, sampled with classifier-free guidance, judged
  by a small CNN trained on the run's train split (armodal.digit_classifier), whose own
  held-out accuracy is reported beside it.
Examples land in <run>/eval/: captions.jsonl and text_to_image.png (a row per digit).

Speech and transcripts (multimodal_speech_text), character error rate (CER: edit distance over
reference length, case and punctuation ignored) on the held-out utterances:
- speech -> text: greedy transcripts of the held-out speech.
- text -> speech: speech sampled from each held-out transcript, decoded to a waveform by the
  codec, re-encoded and transcribed by the speech -> text direction of the same model.
WAVs of the first generated clips land in <run>/eval/.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from armodal.checkpoint import LoadedRun, instantiate_from_run
from armodal.crossmodal import next_segment
from armodal.data.paired import DIGIT_WORDS, DigitCaptions, caption_digit
from armodal.digit_classifier import load_or_train_classifier
from armodal.generation import DecodingConfig

__all__ = ["DigitCaptionResult", "digit_caption_source", "evaluate_digit_captions",
           "SpeechResult", "evaluate_speech_transcripts", "character_error_rate"]


@dataclass
class DigitCaptionResult:
    image_to_text_accuracy: float
    captioned_images: int
    text_to_image_accuracy: float
    generated_images: int
    classifier_test_accuracy: float
    cfg_scale: float
    temperature: float
    examples_dir: str

    def table(self) -> str:
        return "\n".join([
            f"image -> text  {self.image_to_text_accuracy:6.1%} of {self.captioned_images} "
            f"held-out images captioned with their digit (greedy)",
            f"text -> image  {self.text_to_image_accuracy:6.1%} of {self.generated_images} "
            f"generated images classified as the asked digit (cfg_scale {self.cfg_scale}, "
            f"temperature {self.temperature})",
            f"classifier     {self.classifier_test_accuracy:6.1%} on the held-out real images",
            f"examples       {self.examples_dir}",
        ])

    def as_dict(self) -> dict:
        return asdict(self)


def mixture_source(run: LoadedRun, kind: str):
    """The first source of class `kind` in the mixture a run was trained on, or None."""
    mixture = (run.meta.get("train_config") or {}).get("domain", {}).get("mixture") or {}
    for part in mixture.values():
        source = part.get("source") or {}
        if str(source.get("_target_", "")).endswith(kind):
            return instantiate_from_run(source, "domain.mixture.<part>.source")
    return None


def digit_caption_source(run: LoadedRun) -> DigitCaptions:
    """The DigitCaptions source a run was trained on, rebuilt from its config."""
    source = mixture_source(run, "DigitCaptions")
    if source is None:
        raise ValueError(f"{run.path} was not trained on digit captions (no DigitCaptions part "
                         f"in its mixture); this evaluation needs one")
    return source


def _batched(model, tokenizer, prompts, modality, decoding, batch_size):
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start: start + batch_size]
        seeds = None if decoding.seed is None else \
            [decoding.seed + start + i for i in range(len(chunk))]
        out += [c for c, _ in next_segment(model, tokenizer, chunk, modality, decoding, seeds)]
    return out


def evaluate_digit_captions(run: LoadedRun, images: int | None = None, per_class: int = 20,
                            cfg_scale: float = 2.0, temperature: float = 1.0, seed: int = 0,
                            batch_size: int = 100) -> DigitCaptionResult:
    """Caption `images` held-out images (None: all) and draw `per_class` images per digit."""
    source = digit_caption_source(run)
    train, val = source.split_sets()
    n = len(val) if images is None else min(images, len(val))
    model, tok = run.model.eval(), run.tokenizer
    captions = _batched(model, tok, [[("image", im)] for im in val.images[:n]], "text",
                        DecodingConfig(strategy="greedy", max_new_tokens=40), batch_size)
    truth = val.labels[:n].tolist()
    right = [caption_digit(c) == y for c, y in zip(captions, truth)]

    classifier, clf_acc = load_or_train_classifier(run.path / "eval", train.images,
                                                   train.labels, val.images, val.labels)
    asked = [d for d in range(10) for _ in range(per_class)]
    prompts = [[("text", f"a handwritten {DIGIT_WORDS[d]}")] for d in asked]
    decoding = DecodingConfig(strategy="sample", temperature=temperature, cfg_scale=cfg_scale,
                              seed=seed)
    drawn = torch.stack(_batched(model, tok, prompts, "image", decoding, batch_size))
    t2i = (classifier.predict(drawn) == torch.tensor(asked)).float().mean().item()

    out = run.path / "eval"
    _write_examples(out, captions, truth, drawn, per_class)
    return DigitCaptionResult(sum(right) / n, n, t2i, len(asked), clf_acc, cfg_scale,
                              temperature, str(out))


def _write_examples(out: Path, captions: list[str], truth: list[int], drawn: torch.Tensor,
                    per_class: int) -> None:
    from armodal.imagegen import save_grid

    out.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"digit": y, "caption": c}) + "\n" for c, y in zip(captions, truth)]
    (out / "captions.jsonl").write_text("".join(lines))
    shown = min(per_class, 10)
    rows = torch.stack([drawn[d * per_class: d * per_class + shown] for d in range(10)])
    save_grid(rows.flatten(0, 1), out / "text_to_image.png", nrow=shown)


@dataclass
class SpeechResult:
    speech_to_text_cer: float
    text_to_speech_cer: float
    utterances: int
    temperature: float
    examples_dir: str

    def table(self) -> str:
        return "\n".join([
            f"speech -> text  CER {self.speech_to_text_cer:6.1%} over {self.utterances} "
            f"held-out utterances (greedy)",
            f"text -> speech  CER {self.text_to_speech_cer:6.1%} when the generated speech "
            f"(temperature {self.temperature}) is transcribed by the same model",
            f"examples        {self.examples_dir}",
        ])

    def as_dict(self) -> dict:
        return asdict(self)


def _normalized(text: str) -> str:
    return " ".join("".join(ch for ch in text.lower() if ch.isalnum() or ch == " ").split())


def character_error_rate(hypotheses: list[str], references: list[str]) -> float:
    """Summed edit distance over summed reference length (case and punctuation ignored)."""
    import torchaudio.functional as AF

    refs = [_normalized(r) for r in references]
    errors = sum(AF.edit_distance(list(_normalized(h)), list(r))
                 for h, r in zip(hypotheses, refs))
    return errors / max(1, sum(len(r) for r in refs))


def evaluate_speech_transcripts(run: LoadedRun, utterances: int | None = None,
                                temperature: float = 1.0, seed: int = 0,
                                batch_size: int = 50, max_seconds: float = 3.0) -> SpeechResult:
    """CER of both directions on the held-out utterances (the first `utterances` of them)."""
    import soundfile as sf

    source = mixture_source(run, "SpeechTranscripts")
    if source is None:
        raise ValueError(f"{run.path} was not trained on speech transcripts (no "
                         f"SpeechTranscripts part in its mixture); this evaluation needs one")
    _, val = dataclasses.replace(source, order="audio_text").split_samples()
    val = val[:utterances]
    model, tok = run.model.eval(), run.tokenizer
    codec = tok.part("audio")
    texts = [t for (_, _), (_, t) in val]
    transcribe = DecodingConfig(strategy="greedy", max_new_tokens=60)
    heard = _batched(model, tok, [[("audio", w)] for (_, w), _ in val], "text", transcribe,
                     batch_size)
    frames = int(max_seconds * codec.frame_rate)
    speak = DecodingConfig(strategy="sample", temperature=temperature, seed=seed,
                           max_new_tokens=frames)
    spoken = _batched(model, tok, [[("text", t)] for t in texts], "audio", speak, batch_size)
    # The generated waveform, not its codes, is what is transcribed: re-encoded by the codec.
    reheard = _batched(model, tok, [[("audio", w)] for w in spoken], "text", transcribe,
                       batch_size)
    out = run.path / "eval"
    out.mkdir(parents=True, exist_ok=True)
    for i, wave in enumerate(spoken[:8]):
        sf.write(out / f"text_to_speech_{i}.wav", wave.numpy(), codec.sample_rate)
    lines = [json.dumps({"text": t, "heard": h, "spoken_then_heard": r}) + "\n"
             for t, h, r in zip(texts, heard, reheard)]
    (out / "speech_transcripts.jsonl").write_text("".join(lines))
    return SpeechResult(character_error_rate(heard, texts), character_error_rate(reheard, texts),
                        len(val), temperature, str(out))
