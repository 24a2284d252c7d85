"""An offline speech corpus: English sentences spoken by espeak-ng, each transcript kept beside
its audio.

The sentences come from a text file (`text_file`, e.g. tiny shakespeare) or, by default, from
the first sentences of the docstrings in Python's standard library, which every machine has.
Each utterance gets a seeded voice (accent, male/female variant), speed and pitch, so the corpus
is not one monotone speaker. The corpus is built once into `<cache_dir>/<key>/` (`NNNNN.wav` +
`NNNNN.txt` per utterance, then `meta.json`, written last) in a temp dir renamed into place, so
a killed build never looks finished.

espeak-ng is a Debian package (`apt-get install espeak-ng`); `make speech` installs it where
apt is permitted. Without it, building a corpus raises a RuntimeError that says so.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from armodal.data.audio import AudioSet, clips_and_texts, read_many

__all__ = ["SpeechCorpus", "espeak_available", "sentences_from_docstrings", "sentences_from_text"]

ESPEAK = "espeak-ng"
FORMAT_VERSION = 1
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+f2", "en-us+m3",
          "en-gb-x-rp+f4")
_SENTENCE = re.compile(r"[A-Z][^.!?;:]*[.!?]")
_SPEAKABLE = re.compile(r"^[A-Za-z ,'\-]+[.!?]$")


def espeak_available() -> bool:
    return shutil.which(ESPEAK) is not None


def _speakable(sentence: str, min_words: int, max_words: int) -> bool:
    """Plain words only: code, numbers and symbols make espeak spell things out."""
    words = sentence.split()
    return min_words <= len(words) <= max_words and bool(_SPEAKABLE.match(sentence))


def sentences_from_text(text: str, min_words: int = 3, max_words: int = 10) -> list[str]:
    """Sentences of plain words (a capital start, a . ! or ? end), whitespace collapsed."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE.findall(flat) if _speakable(s, min_words, max_words)]


def sentences_from_docstrings(min_words: int = 3, max_words: int = 10) -> list[str]:
    """First sentences of the standard library's docstrings, sorted and unique."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: set[str] = set()
    for path in sorted(stdlib.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    found.update(sentences_from_text(doc.split("\n\n")[0], min_words, max_words))
    return sorted(found)


class SpeechCorpus:
    """`n_utterances` espeak-ng utterances as clips of `clip_seconds` at `sample_rate`.

    An utterance longer than a clip becomes several clips (each with the utterance's
    transcript); a shorter one is zero-padded. Utterances are read in corpus order, so a
    tail split holds out whole utterances but for the one at the cut.
    """

    def __init__(self, n_utterances: int = 2000, sample_rate: int = 16000,
                 clip_seconds: float = 2.0, text_file: str | None = None,
                 cache_dir: str = "~/.cache/armodal/speech", seed: int = 0,
                 min_words: int = 3, max_words: int = 8, workers: int = 4,
                 vocabulary: list[str] | None = None) -> None:
        if n_utterances < 1:
            raise ValueError(f"SpeechCorpus: n_utterances must be >= 1, got {n_utterances}")
        if not 1 <= min_words <= max_words:
            raise ValueError(f"SpeechCorpus: need 1 <= min_words <= max_words, got "
                             f"{min_words}, {max_words}")
        self.n_utterances, self.sample_rate, self.clip_seconds = n_utterances, sample_rate, \
            clip_seconds
        self.text_file, self.cache_dir, self.seed = text_file, cache_dir, seed
        self.min_words, self.max_words, self.workers = min_words, max_words, workers
        # vocabulary: utterances are seeded random strings of these words (e.g. the digit
        # names: a small, TIDIGITS-like task) instead of sentences from text.
        self.vocabulary = list(vocabulary) if vocabulary is not None else None
        if self.vocabulary is not None and not all(
                isinstance(w, str) and w.isalpha() for w in self.vocabulary):
            raise ValueError(f"SpeechCorpus: vocabulary must be plain words, got "
                             f"{self.vocabulary!r}")

    def settings(self) -> dict:
        """What the built corpus depends on (its cache key); not the rate or clip length,
        which are applied when loading."""
        text = None
        if self.text_file is not None:
            path = Path(os.path.expanduser(self.text_file))
            if not path.is_file():
                raise FileNotFoundError(f"SpeechCorpus: text_file {str(path)!r} is not a file")
            text = hashlib.sha256(path.read_bytes()).hexdigest()
        return {"format": FORMAT_VERSION, "n": self.n_utterances, "text": text,
                "seed": self.seed, "words": [self.min_words, self.max_words],
                "voices": list(VOICES),
                **({"vocabulary": self.vocabulary} if self.vocabulary is not None else {})}

    def fingerprint(self) -> str:
        blob = json.dumps({**self.settings(), "rate": self.sample_rate,
                           "clip": self.clip_seconds}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def directory(self) -> Path:
        """The built corpus (built on first use): NNNNN.wav + NNNNN.txt, meta.json."""
        settings = self.settings()
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:20]
        root = Path(os.path.expanduser(self.cache_dir))
        final = root / key
        if (final / "meta.json").is_file():
            return final
        if not espeak_available():
            raise RuntimeError("the speech corpus needs espeak-ng, which is not installed: "
                               "run `make speech` (apt-get install espeak-ng) or point the "
                               "audio domain at your own files (domain.audio._target_="
                               "armodal.data.audio.AudioFolder domain.audio.root=<dir>)")
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        try:
            self._build(tmp, settings)
            if final.exists():  # another process finished the same corpus first
                shutil.rmtree(tmp)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _sentences(self) -> list[str]:
        if self.vocabulary is not None:
            rng = random.Random(self.seed)
            words = [[rng.choice(self.vocabulary)
                      for _ in range(rng.randint(self.min_words, self.max_words))]
                     for _ in range(self.n_utterances)]
            return [" ".join(w).capitalize() + "." for w in words]
        if self.text_file is None:
            pool = sentences_from_docstrings(self.min_words, self.max_words)
        else:
            text = Path(os.path.expanduser(self.text_file)).read_text(errors="replace")
            pool = sorted(set(sentences_from_text(text, self.min_words, self.max_words)))
        if not pool:
            raise ValueError(f"SpeechCorpus: no sentence of {self.min_words}-{self.max_words} "
                             f"plain words found in {self.text_file or 'stdlib docstrings'}")
        rng = random.Random(self.seed)
        # Sentences repeat (with other voices) only when the pool is smaller than asked.
        return [pool[i % len(pool)] for i in rng.sample(range(len(pool)), len(pool))] \
            * (self.n_utterances // len(pool) + 1)

    def _build(self, tmp: Path, settings: dict) -> None:
        rng = random.Random(self.seed + 1)
        jobs = [(i, text, rng.choice(VOICES), rng.randint(140, 190), rng.randint(30, 70))
                for i, text in enumerate(self._sentences()[:self.n_utterances])]

        def speak(job: tuple[int, str, str, int, int]) -> None:
            i, text, voice, speed, pitch = job
            wav = tmp / f"{i:05d}.wav"
            subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch),
                            "-w", str(wav), text], check=True, capture_output=True)
            (tmp / f"{i:05d}.txt").write_text(text + "\n")

        with ThreadPoolExecutor(self.workers) as pool:
            list(pool.map(speak, jobs))
        meta = {**settings, "utterances": [{"file": f"{i:05d}.wav", "text": t, "voice": v,
                                            "speed": s, "pitch": p} for i, t, v, s, p in jobs]}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))

    def load(self) -> AudioSet:
        directory = self.directory()
        meta = json.loads((directory / "meta.json").read_text())
        clip_samples = round(self.clip_seconds * self.sample_rate)
        utterances = meta["utterances"]
        waves = read_many([directory / u["file"] for u in utterances], self.sample_rate)
        clips, texts = clips_and_texts(waves, [u["text"] for u in utterances], clip_samples)
        return AudioSet(clips, self.sample_rate, texts, f"speech:{directory.name}")
