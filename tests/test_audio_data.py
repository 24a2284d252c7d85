"""Audio sources, the mu-law tokenizer, WAV output and the audio data module's layouts."""

import math
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch

from armodal.audiogen import save_spectrogram, save_wav
from armodal.data.audio import (
    AudioFolder,
    AudioSet,
    SyntheticTones,
    cut_clips,
    read_audio,
    resample_many,
    split_audio,
)
from armodal.data.audio_module import AudioDataModule, AudioLayout, audio_layout
from armodal.data.speech import SpeechCorpus, sentences_from_text
from armodal.tokenizers.audio import MuLawTokenizer
from armodal.tokenizers.base import check_tokenizer
from armodal.tokenizers.patterns import stream_pattern
from armodal.tokenizers.space import TokenSpace

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                  reason="espeak-ng is not installed (make speech)")


def companded(x: torch.Tensor, mu: int) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(mu * x.abs()) / math.log1p(mu)


@pytest.mark.parametrize("bits", [8, 10])
def test_mulaw_round_trip_within_half_a_companded_step(bits):
    tok = MuLawTokenizer(sample_rate=8000, bits=bits)
    x = torch.cat([torch.linspace(-1, 1, 4001), 0.01 * torch.randn(1000)]).clamp(-1, 1)
    ids = tok.encode(x)
    assert ids.dtype == torch.int64 and 0 <= int(ids.min()) and int(ids.max()) < 2 ** bits
    back = tok.decode(ids)
    mu = 2 ** bits - 1
    # One level is 2 / mu wide in the companded domain: rounding errs by at most half of it.
    assert (companded(back, mu) - companded(x, mu)).abs().max() <= 1 / mu + 1e-5
    # ... which is fine near silence and coarse near full scale.
    assert (back - x)[x.abs() < 0.01].abs().max() < 5e-4 < (back - x).abs().max() / 10


def test_mulaw_conformance_and_errors():
    tok = MuLawTokenizer()
    check_tokenizer(tok, [torch.sin(torch.arange(300) / 7.0), torch.zeros(5)])
    with pytest.raises(ValueError, match="mono waveform"):
        tok.encode(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="no samples"):
        tok.encode(torch.zeros(0))
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        tok.decode(torch.tensor([0, 256]))
    with pytest.raises(ValueError, match="bits must be"):
        MuLawTokenizer(bits=0)


def test_wav_written_and_read_back_equals_the_decoded_tensor(tmp_path):
    tok = MuLawTokenizer(sample_rate=8000)
    wave = tok.decode(tok.encode(0.5 * torch.sin(torch.arange(4000) / 5.0)))
    path = save_wav(wave, 8000, tmp_path / "out.wav")
    data, rate = sf.read(str(path), dtype="float32")
    assert rate == 8000 and data.shape == (4000,)
    assert np.abs(data - wave.numpy()).max() <= 1 / 32767  # 16-bit PCM
    png = save_spectrogram(wave, 8000, tmp_path / "out.png")
    assert png.stat().st_size > 1000 and not list(tmp_path.glob(".*tmp*"))


def test_read_audio_resamples_mixes_and_refuses(tmp_path):
    stereo = np.stack([np.full(2205, 0.5), np.full(2205, -0.1)], 1).astype(np.float32)
    sf.write(str(tmp_path / "s.wav"), stereo, 22050)
    wave = read_audio(tmp_path / "s.wav", 16000)
    assert wave.shape == (1600,) and abs(float(wave[800]) - 0.2) < 1e-3
    with pytest.raises(ValueError, match="2 channels"):
        read_audio(tmp_path / "s.wav", 16000, mono="refuse")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    with pytest.raises(ValueError, match="bad.wav"):
        read_audio(tmp_path / "bad.wav", 16000)
    sf.write(str(tmp_path / "empty.wav"), np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="no samples"):
        read_audio(tmp_path / "empty.wav", 16000)


def test_resample_many_equals_one_by_one():
    import torchaudio.functional as AF

    waves = [torch.randn(n) * 0.3 for n in (2205, 441, 5000)]
    together = resample_many(waves, 22050, 16000)
    for wave, got in zip(waves, together):
        alone = AF.resample(wave, 22050, 16000).clamp(-1, 1)
        assert got.shape == alone.shape
        # Away from the ends (where the neighbour's padding rings in) they agree exactly.
        assert torch.allclose(got[40:-40], alone[40:-40], atol=1e-6)


def test_cut_clips_and_split():
    wave = torch.arange(25, dtype=torch.float32)
    assert cut_clips(wave, 10).shape == (3, 10)  # 5 left over: half a clip, padded
    assert cut_clips(wave, 10, min_fraction=0.6).shape == (2, 10)
    assert cut_clips(wave[:3], 10).tolist()[0][:4] == [0, 1, 2, 0]  # short: one padded clip
    data = AudioSet(torch.zeros(10, 8), 8000, [str(i) for i in range(10)], "x")
    train, val = split_audio(data, 0.2)
    assert (len(train), len(val)) == (8, 2) and val.transcripts == ["8", "9"]
    with pytest.raises(ValueError, match="val_fraction"):
        split_audio(data, 0.01)


def test_audio_folder_reads_files_with_transcripts(tmp_path):
    for i in range(2):
        sf.write(str(tmp_path / f"u{i}.flac"), np.zeros(8000 * (i + 1), np.float32), 8000)
    (tmp_path / "u1.txt").write_text("hello there\n")
    data = AudioFolder(str(tmp_path), sample_rate=8000, clip_seconds=1.0).load()
    assert data.clips.shape == (3, 8000) and data.transcripts == ["", "hello there", "hello there"]
    with pytest.raises(FileNotFoundError, match="not a directory"):
        AudioFolder(str(tmp_path / "none")).files()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .wav/.flac/.ogg"):
        AudioFolder(str(tmp_path / "empty")).files()
    (tmp_path / "u1.txt").write_bytes("héllo".encode("latin-1"))  # not UTF-8
    with pytest.raises(ValueError, match=r"transcript '.*u1\.txt' is not UTF-8 text"):
        AudioFolder(str(tmp_path), sample_rate=8000, clip_seconds=1.0).load()


def test_sentences_are_plain_words():
    text = "He said 3 things. Go now, friend! x = f(y). Is it so? A b."
    assert sentences_from_text(text, 2, 10) == ["Go now, friend!", "Is it so?", "A b."]


@needs_espeak
def test_speech_corpus_keeps_each_transcript_beside_its_audio(tmp_path):
    corpus = SpeechCorpus(n_utterances=3, sample_rate=8000, clip_seconds=4.0,
                          cache_dir=str(tmp_path))
    data = corpus.load()
    directory = corpus.directory()
    assert len(list(directory.glob("*.wav"))) == 3
    for i in range(3):
        assert (directory / f"{i:05d}.txt").read_text().strip() in data.transcripts
    assert data.clips.shape[1] == 32000 and data.clips.abs().max() > 0.05
    again = SpeechCorpus(n_utterances=3, sample_rate=8000, clip_seconds=4.0,
                         cache_dir=str(tmp_path)).load()  # from the cache, identical
    assert torch.equal(again.clips, data.clips)


def test_speech_corpus_without_espeak_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="make speech"):
        SpeechCorpus(n_utterances=2, cache_dir=str(tmp_path)).load()


def test_mulaw_module_windows_and_units():
    tok = MuLawTokenizer(sample_rate=8000)
    dm = AudioDataModule(SyntheticTones(n=10, sample_rate=8000, clip_seconds=0.1), tok,
                         batch_size=2, seq_len=64)
    dm.prepare_shards()
    dm.setup()
    s = dm.space
    assert dm.seq_len == 64 and dm.val_sequences.shape[1] == 65
    stream = dm.train_sequences
    assert stream[:2].tolist() == [s.bos_id, s.special_ids["<boa>"]]
    assert len(stream) == 9 * (800 + 4)
    batch = next(iter(dm.train_dataloader()))
    assert batch.shape == (2, 65)
    mult, unit, (lo, hi) = dm.units()
    assert unit == "sample" and hi - lo == 256 and lo == s.offset("audio")
    with pytest.raises(ValueError, match="8000 Hz but the tokenizer takes 16000"):
        AudioDataModule(SyntheticTones(n=10, sample_rate=8000), MuLawTokenizer(16000), 2,
                        seq_len=64).prepare_shards()


class FakeCodec:
    """Codes from a fixed rule, enough to check the codec layouts without a trained codec."""

    modality, unit, lossless = "audio", "frame", False
    sample_rate, n_levels, codebook_size, hop = 8000, 3, 5, 100
    frame_rate = 80.0
    vocab_size = 5

    def encode_batch(self, clips):
        frames = clips.shape[1] // self.hop
        base = torch.arange(frames) % 5
        return torch.stack([(base + k) % 5 for k in range(3)])[None].expand(len(clips), -1, -1)


@pytest.mark.parametrize("pattern", ["delay", "parallel", "flatten"])
def test_codec_layout_sequences(pattern):
    dm = AudioDataModule(SyntheticTones(n=10, sample_rate=8000, clip_seconds=0.1), FakeCodec(),
                         batch_size=2, pattern=pattern)
    dm.prepare_shards()
    s, laid = dm.space, dm.layout.pattern
    seq = dm.val_sequences
    frames = 8
    if pattern == "flatten":
        assert seq.shape == (1, 2 + 3 * frames + 2) and s.modalities["audio"] == 15
    else:
        assert seq.shape == (1, 3, 2 + laid.length(frames) + 2)
        assert (seq[0, :, :2] == torch.tensor([s.bos_id, s.special_ids["<boa>"]])).all()
        assert (seq[0, :, -2:] == torch.tensor([s.special_ids["<eoa>"], s.eos_id])).all()
    codes = seq.reshape(1, laid.n_streams, -1)[..., 2:-2]
    back = laid.revert(torch.where(codes == s.pad_id, -1, codes - s.offset("audio")))
    assert torch.equal(back, FakeCodec().encode_batch(torch.zeros(1, 800)))
    if pattern == "delay":
        assert (codes[0, 2, :2] == s.pad_id).all() and (codes[0, 0, -2:] == s.pad_id).all()
    assert dm.seq_len == seq.shape[-1] - 1
    assert AudioLayout.for_run(s, dm.run_meta(), FakeCodec()).to_dict() == dm.layout.to_dict()
    other = FakeCodec()
    other.n_levels = 4
    with pytest.raises(ValueError, match="K=3 levels of 5 codes, but its codec gives K=4"):
        AudioLayout.for_run(s, dm.run_meta(), other)


def test_codec_domain_refuses_a_window_length():
    with pytest.raises(ValueError, match="seq_len=64"):
        AudioDataModule(SyntheticTones(), FakeCodec(), 2, seq_len=64)
    assert audio_layout(MuLawTokenizer(), "delay").pattern is None
    assert stream_pattern("delay", 3, 5).n_streams == 3
    assert isinstance(audio_layout(FakeCodec(), "flatten").space, TokenSpace)


def test_codec_tokenizer_conformance_and_levels(tiny_audio_codec, tiny_codec):
    from armodal.tokenizers.audio import CodecTokenizer

    tok = CodecTokenizer(str(tiny_audio_codec))
    waves = [0.3 * torch.sin(torch.arange(800) / 4.0), 0.1 * torch.randn(410)]
    check_tokenizer(tok, waves)
    codes = tok.encode(waves[1])
    assert codes.shape == (3, 21) and tok.count_units(waves[1]) == 21  # ceil(410 / 20)
    assert tok.decode(codes).shape == (420,) and tok.frame_rate == 400.0
    assert tok.bitrate == 400 * 3 * 4
    batch = tok.encode_batch(torch.stack([waves[0], waves[0]]))
    assert torch.equal(batch[0], tok.encode(waves[0])) and torch.equal(batch[0], batch[1])
    low = CodecTokenizer(str(tiny_audio_codec), n_q=2)
    assert torch.equal(low.encode(waves[0]), tok.encode(waves[0])[:2])
    with pytest.raises(ValueError, match=r"n_q must be in \[1, 3\]"):
        CodecTokenizer(str(tiny_audio_codec), n_q=4)
    with pytest.raises(ValueError, match="K = 3"):
        tok.decode(codes[:2])
    with pytest.raises(ValueError, match="armodal.vqvae codec; this needs a armodal.audio_codec"):
        CodecTokenizer(str(tiny_codec))
    from armodal.tokenizers.image import VQTokenizer

    with pytest.raises(ValueError, match="`armodal train image_vq_tokenizer`"):
        VQTokenizer(str(tiny_audio_codec))
