"""Audio front end: decoding, segments, resampling, chunking, and the JAX log-mel against
transformers' WhisperFeatureExtractor (required: <= 1e-4 abs in fp32)."""

import shutil
import subprocess

import jax
import numpy as np
import pytest
import soundfile as sf
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import mel_filter_bank

from mufun_jax import audio

SR = audio.SAMPLE_RATE
MEL_TOL = 1e-4


def chords(seconds: float, rng) -> np.ndarray:
    """A C-major / A-minor progression with harmonics and note envelopes."""
    t = np.arange(int(seconds * SR)) / SR
    out = np.zeros_like(t)
    for k, notes in enumerate([(261.6, 329.6, 392.0), (220.0, 261.6, 329.6)] * int(seconds)):
        start = k * 0.5
        env = np.clip((t - start) * 20, 0, 1) * np.exp(-np.clip(t - start, 0, None) * 3) * (t >= start)
        for f in notes:
            for h in (1, 2, 3):
                out += env * np.sin(2 * np.pi * f * h * t + rng.uniform(0, 6.28)) / (h * 3)
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def drums(seconds: float, rng) -> np.ndarray:
    """Kick (decaying low sine) and snare (decaying noise burst) at 120 bpm."""
    n = int(seconds * SR)
    out = np.zeros(n)
    for beat in range(int(seconds * 2)):
        s = beat * SR // 2
        m = min(SR // 4, n - s)
        tt = np.arange(m) / SR
        if beat % 2 == 0:
            out[s:s + m] += np.sin(2 * np.pi * 60 * tt * np.exp(-tt * 8)) * np.exp(-tt * 12)
        else:
            out[s:s + m] += rng.standard_normal(m) * np.exp(-tt * 25) * 0.5
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """Real speech from espeak-ng (Debian package), resampled to 16 kHz by our loader."""
    exe = shutil.which("espeak-ng")
    assert exe, "espeak-ng is required for the speech test: apt-get install espeak-ng (.ci/run does this)"
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    subprocess.run([exe, "-w", str(path), "MuFun listens to music and answers questions about the song."],
                   check=True)
    return audio.load_audio(path)


def reference_mel(wave: np.ndarray, n_mels: int = 128) -> np.ndarray:
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    return fe(wave, sampling_rate=SR, return_tensors="np").input_features[0]


def ours(wave: np.ndarray, n_mels: int = 128) -> np.ndarray:
    chunks = audio.chunk(wave)
    assert len(chunks) == 1
    return np.asarray(jax.jit(audio.log_mel_spectrogram, static_argnums=1)(audio.pad_chunks(chunks), n_mels))[0]


def test_mel_filters_match_transformers():
    for n in (80, 128):
        want = mel_filter_bank(num_frequency_bins=201, num_mel_filters=n, min_frequency=0.0, max_frequency=8000.0,
                               sampling_rate=SR, norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(audio.mel_filters(n), want, atol=1e-9)


@pytest.mark.parametrize("kind", ["noise", "chords", "drums", "short", "mel80"])
def test_log_mel_matches_feature_extractor(kind):
    rng = np.random.default_rng(0)
    wave = {
        "noise": lambda: (0.1 * rng.standard_normal(SR * 30)).astype(np.float32),
        "chords": lambda: chords(30, rng),
        "drums": lambda: drums(30, rng),
        "short": lambda: chords(2.3, rng),  # padded to 30 s
        "mel80": lambda: drums(12, rng),
    }[kind]()
    n_mels = 80 if kind == "mel80" else 128
    want = reference_mel(wave, n_mels)
    got = ours(wave, n_mels)
    assert got.shape == want.shape == (n_mels, 3000)
    err = float(np.max(np.abs(got - want)))
    print(f"log-mel {kind}: max abs err {err:.2e}")
    assert err <= MEL_TOL


def test_log_mel_on_espeak_speech(speech):
    want = reference_mel(speech)
    err = float(np.max(np.abs(ours(speech) - want)))
    print(f"log-mel speech: max abs err {err:.2e}")
    assert err <= MEL_TOL


def test_log_mel_rejects_unpadded_input():
    with pytest.raises(ValueError, match="480000"):
        audio.log_mel_spectrogram(np.zeros((1, 1000), np.float32))


@pytest.mark.parametrize("n, expect", [(100, [100]), (480000, [480000]), (480001, [480000]),
                                       (488000, [480000]), (488001, [480000, 8001]),
                                       (1_000_000, [480000, 480000, 40000])])
def test_chunking_rule(n, expect):
    assert [len(c) for c in audio.chunk(np.zeros(n, np.float32))] == expect


def write(path, x, sr, **kw):
    sf.write(str(path), np.asarray(x), sr, **kw)
    return path


def test_formats_decode_to_the_same_signal(tmp_path):
    sr = 48000
    t = np.arange(sr * 2) / sr
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    paths = [write(tmp_path / "a.wav", x, sr), write(tmp_path / "b.FLAC", x, sr),
             write(tmp_path / "c.ogg", x, sr), write(tmp_path / "d.mp3", x, sr),
             write(tmp_path / "e.opus", x, sr, format="OGG", subtype="OPUS")]
    import av

    with av.open(str(tmp_path / "f.m4a"), "w") as out:  # AAC in MP4, encoded by PyAV
        st = out.add_stream("aac", rate=sr)
        st.layout = "mono"
        for i in range(0, len(x), 1024):
            frame = av.AudioFrame.from_ndarray(x[None, i:i + 1024], format="fltp", layout="mono")
            frame.sample_rate = sr
            out.mux(st.encode(frame))
        out.mux(st.encode(None))
    paths.append(tmp_path / "f.m4a")
    ref = audio.resample(x, sr)
    for p in paths:
        y = audio.load_audio(p)
        assert abs(len(y) - len(ref)) <= 0.1 * SR, p  # codecs may add priming / padding samples
        spec = np.abs(np.fft.rfft(y[: SR]))
        assert abs(np.argmax(spec) * SR / SR - 440) <= 2, p  # 1 s window: bin = Hz
        assert 0.15 < np.sqrt(np.mean(y ** 2)) < 0.3, p


def test_stereo_mixes_down_and_npy_is_16k(tmp_path):
    x = np.random.default_rng(0).standard_normal(SR).astype(np.float32) * 0.1
    y = audio.load_audio(write(tmp_path / "s.wav", np.stack([x, 0.5 * x], 1), SR, subtype="FLOAT"))
    np.testing.assert_allclose(y, 0.75 * x, atol=1e-6)
    np.save(tmp_path / "w.npy", x)
    np.testing.assert_array_equal(audio.load_audio(tmp_path / "w.npy"), x)


def test_segment_crops_at_native_rate_before_resampling(tmp_path):
    sr = 44100
    x = np.arange(sr * 40, dtype=np.float32) / (sr * 40)  # a ramp: the crop position is visible
    p = write(tmp_path / "ramp.wav", x, sr, subtype="FLOAT")
    y = audio.load_audio(p, segment=[10, 12.5])
    assert abs(len(y) - 2.5 * SR) <= 2
    assert abs(float(np.median(y)) - 11.25 / 40) < 2e-3
    # [0, 30.0] is honoured (the reference silently ignores a segment whose start is the int 0)
    assert abs(len(audio.load_audio(p, segment=[0, 30.0])) - 30 * SR) <= 2
    assert len(audio.chunk(audio.load_audio(p))) == 2


@pytest.mark.parametrize("case, reason", [("missing", "missing_file"), ("txt", "unsupported_extension"),
                                          ("garbage", "undecodable"), ("empty", "empty_audio"),
                                          ("late_segment", "segment_out_of_range"), ("bad_segment", "bad_segment")])
def test_bad_audio_raises_with_reason(tmp_path, case, reason):
    seg = None
    if case == "missing":
        p = tmp_path / "nope.wav"
    elif case == "txt":
        p = tmp_path / "notes.txt"
        p.write_text("hello")
    elif case == "garbage":
        p = tmp_path / "bad.wav"
        p.write_bytes(b"RIFF....WAVEfmt garbage" * 10)
    elif case == "empty":
        p = tmp_path / "empty.npy"
        np.save(p, np.zeros(0, np.float32))
    else:
        p = write(tmp_path / "one.wav", np.zeros(SR, np.float32), SR)
        seg = [5, 6] if case == "late_segment" else [3, 2]
    with pytest.raises(audio.AudioError) as e:
        audio.load_audio(p, segment=seg)
    assert e.value.reason == reason
    assert str(p) in str(e.value)
