"""Audio front end: decode -> mono float32 -> optional segment crop (native rate) -> 16 kHz ->
30 s chunks -> Whisper log-mel.

The log-mel is written in JAX so that it can run on the accelerator inside the jitted step
(the host then ships only 16 kHz waveforms); the same function runs on the host's CPU backend.
It reproduces transformers' ``WhisperFeatureExtractor``: n_fft 400, hop 160, periodic Hann,
centred STFT with reflect padding, Slaney mel filters over 0-8 kHz, log10 with a 1e-10 clamp,
the last frame dropped, a floor at max - 8 per chunk, then (x + 4) / 4.

Where the reference is defective we do what it intends: a segment ``[0, 30.0]`` is honoured
(the reference ignores segments whose start is the int 0), and an unreadable file raises
:class:`AudioError` with a reason instead of crashing the run later.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from mufun_jax.errors import InputError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SAMPLES = 30 * SAMPLE_RATE  # 480000 -> 3000 frames -> 300 audio tokens
MIN_TAIL_SAMPLES = 8000  # a trailing chunk is kept only if longer than 0.5 s, as in the reference
N_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000

SOUNDFILE_EXTS = {".wav", ".flac", ".ogg", ".oga"}
AV_EXTS = {".mp3", ".opus", ".m4a", ".aac", ".webm", ".mp4"}


class AudioError(InputError):
    """An audio input that cannot be used; ``reason`` is a short counter key."""


# -- decoding --------------------------------------------------------------------------------


def _decode_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf

    x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    return x.mean(axis=1), int(sr)


def _decode_av(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as container:
        streams = container.streams.audio
        if not streams:
            raise AudioError("undecodable", f"{path}: no audio stream")
        sr = int(streams[0].sample_rate or streams[0].codec_context.sample_rate)
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=sr)
        parts = []
        for frame in container.decode(streams[0]):
            for f in resampler.resample(frame):
                parts.append(f.to_ndarray().reshape(-1))
        for f in resampler.resample(None):
            parts.append(f.to_ndarray().reshape(-1))
    return (np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)), sr


# np.load parses the .npy header with ast.literal_eval, and CPython 3.11's AST constructor is not
# safe across threads: grain's reader threads then failed a valid file now and then with
# "SystemError: AST constructor recursion depth mismatch" (seen in tests/test_loader.py).
_NPY_LOCK = threading.Lock()


def decode(path: str | Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples at the file's own rate. ``.npy`` is a raw 16 kHz waveform."""
    path = Path(path)
    if not path.is_file():
        raise AudioError("missing_file", f"{path}: no such file")
    ext = path.suffix.lower()
    try:
        if ext == ".npy":
            with _NPY_LOCK:
                x = np.load(path, allow_pickle=False)
            if x.ndim == 2:  # (channels, samples) or (samples, channels): mix down the short axis
                x = x.mean(axis=int(np.argmin(x.shape)))
            if x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
                raise AudioError("undecodable", f"{path}: expected a 1-D float waveform, got {x.dtype} {x.shape}")
            return x.astype(np.float32), SAMPLE_RATE
        if ext in SOUNDFILE_EXTS:
            try:
                return _decode_soundfile(path)
            except AudioError:
                raise
            except Exception:
                return _decode_av(path)  # e.g. Opus in .ogg on an old libsndfile
        if ext in AV_EXTS:
            return _decode_av(path)
    except AudioError:
        raise
    except Exception as e:  # decoders raise many types for bad bytes
        raise AudioError("undecodable", f"{path}: cannot decode ({type(e).__name__}: {e})") from e
    raise AudioError("unsupported_extension",
                     f"{path}: unsupported extension {ext!r}; expected one of {sorted(SOUNDFILE_EXTS | AV_EXTS | {'.npy'})}")


def resample(x: np.ndarray, sr: int, target: int = SAMPLE_RATE) -> np.ndarray:
    if sr == target:
        return x.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(x, sr, target, quality="HQ").astype(np.float32)


def crop(x: np.ndarray, sr: int, segment: Sequence[float] | None, where: str = "") -> np.ndarray:
    """``x[int(start*sr):int(end*sr)]`` at the native rate, as the reference does; a segment that
    selects nothing is an error rather than an empty chunk."""
    if segment is None:
        return x
    if len(segment) != 2:
        raise AudioError("bad_segment", f"{where}: segment {list(segment)} must be [start, end] in seconds")
    start, end = float(segment[0]), float(segment[1])
    if start < 0 or end <= start:
        raise AudioError("bad_segment", f"{where}: segment [{start}, {end}] must have 0 <= start < end")
    a, b = int(start * sr), int(end * sr)
    if a >= len(x):
        raise AudioError("segment_out_of_range",
                         f"{where}: segment starts at {start} s but the audio lasts {len(x) / sr:.2f} s")
    return x[a:b]


def load_audio(path: str | Path, segment: Sequence[float] | None = None) -> np.ndarray:
    """Decode, mix to mono, crop the optional segment (seconds) and resample to 16 kHz."""
    x, sr = decode(path)
    x = crop(x, sr, segment, str(path))
    if x.size == 0:
        raise AudioError("empty_audio", f"{path}: no samples{' in the segment' if segment is not None else ''}")
    return resample(x, sr)


def chunk(x: np.ndarray) -> list[np.ndarray]:
    """30 s chunks: audio of 30 s or less is one chunk (however short); longer audio is cut every
    480000 samples and a trailing chunk is kept only if longer than 8000 samples (0.5 s)."""
    if len(x) <= CHUNK_SAMPLES:
        return [x]
    out = [x[i:i + CHUNK_SAMPLES] for i in range(0, len(x), CHUNK_SAMPLES)]
    if len(out[-1]) <= MIN_TAIL_SAMPLES:
        out.pop()
    return out


def pad_chunks(chunks: Sequence[np.ndarray]) -> np.ndarray:
    """Stack chunks into (n, 480000) float32, zero-padding each to 30 s (what the mel expects)."""
    out = np.zeros((len(chunks), CHUNK_SAMPLES), np.float32)
    for i, c in enumerate(chunks):
        n = min(len(c), CHUNK_SAMPLES)
        out[i, :n] = c[:n]
    return out


# -- log-mel (JAX) -----------------------------------------------------------------------------


def _hz_to_mel(f):
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) * (27.0 / np.log(6.4)), mel)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    f = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), f)


def mel_filters(n_mels: int = 128, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE,
                fmin: float = 0.0, fmax: float = 8000.0) -> np.ndarray:
    """Slaney-normalised triangular filters, shape (n_fft // 2 + 1, n_mels)."""
    fft_freqs = np.linspace(0, sample_rate // 2, n_fft // 2 + 1)
    hz = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    diff = np.diff(hz)
    slopes = hz[None, :] - fft_freqs[:, None]
    down = -slopes[:, :-2] / diff[:-1]
    up = slopes[:, 2:] / diff[1:]
    fb = np.maximum(0.0, np.minimum(down, up))
    return fb * (2.0 / (hz[2:n_mels + 2] - hz[:n_mels]))[None, :]


def log_mel_spectrogram(waves, n_mels: int = 128):
    """(n, 480000) 16 kHz waveforms -> (n, n_mels, 3000) Whisper log-mel features (jit-able)."""
    import jax.numpy as jnp

    waves = jnp.asarray(waves, jnp.float32)
    if waves.ndim != 2 or waves.shape[1] != CHUNK_SAMPLES:
        raise ValueError(f"expected waveforms of shape (chunks, {CHUNK_SAMPLES}); got {tuple(waves.shape)}. "
                         "Use audio.chunk() and audio.pad_chunks() first.")
    half = N_FFT // 2
    x = jnp.pad(waves, ((0, 0), (half, half)), mode="reflect")
    n_frames = 1 + CHUNK_SAMPLES // HOP_LENGTH  # 3001, the last one is dropped below
    idx = jnp.arange(n_frames)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]
    window = jnp.asarray(0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT), jnp.float32)  # periodic Hann
    frames = x[:, idx] * window
    spec = jnp.abs(jnp.fft.rfft(frames, axis=-1)) ** 2  # (n, frames, 201)
    mel = jnp.einsum("ntf,fm->nmt", spec[:, :-1], jnp.asarray(mel_filters(n_mels), jnp.float32),
                     precision="highest")
    log_spec = jnp.log10(jnp.maximum(mel, 1e-10))
    log_spec = jnp.maximum(log_spec, log_spec.max(axis=(1, 2), keepdims=True) - 8.0)
    return (log_spec + 4.0) / 4.0


def engine_input(a, whisper) -> tuple[str, np.ndarray]:
    """One audio as the engine takes it -> ("waves", (k, 480000)) or ("mel", (k, n_mels, 3000)):
    waveform chunks, a list of 1-D chunks, a 1-D waveform, or log-mel chunks of ``whisper``'s shape."""
    if isinstance(a, (list, tuple)):
        return "waves", pad_chunks([np.asarray(c, np.float32) for c in a])
    a = np.asarray(a, np.float32)
    if a.ndim == 1:
        return "waves", pad_chunks(chunk(a))
    if a.ndim == 2 and a.shape[1] == CHUNK_SAMPLES:
        return "waves", a
    if a.ndim == 3 and a.shape[1:] == (whisper.num_mel_bins, whisper.num_frames):
        return "mel", a
    raise ValueError(f"an audio must be waveform chunks (k, {CHUNK_SAMPLES}), a list of 1-D chunks, a 1-D waveform "
                     f"or log-mel (k, {whisper.num_mel_bins}, {whisper.num_frames}); got shape {a.shape}")
