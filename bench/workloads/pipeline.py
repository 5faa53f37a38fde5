"""The input-pipeline workload of bench/compare.py: 30 s chunks/s through decode + resample
(soundfile + soxr, a flac at 44.1 kHz stereo) + log-mel, with ``WhisperFeatureExtractor`` on the
host (reference) or our jitted ``audio.log_mel_spectrogram`` on the device (ours). It runs in the
inference children (see :mod:`.inference`), which hold each side's runtime already."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .rows import row
from .settings import Settings

MUSIC = "music.flac"


def write_music(s: Settings, wd: Path, rng: np.random.Generator) -> None:
    """The measured file: ``s.pipeline_chunks`` x 30 s of a tone and noise, flac, 44.1 kHz stereo."""
    import soundfile as sf

    t = np.arange(44100 * 30 * s.pipeline_chunks, dtype=np.float32) / np.float32(44100)
    music = 0.2 * np.sin(np.float32(2 * np.pi * 220) * t) + 0.05 * rng.standard_normal(t.size, dtype=np.float32)
    sf.write(wd / MUSIC, np.stack([music, 0.8 * music], 1), 44100)


def pipeline_ref(path, fe):
    """Decode + resample + WhisperFeatureExtractor: (chunks, decode s, mel s)."""
    from mufun_jax import audio

    t0 = time.perf_counter()
    chunks = audio.chunk(audio.load_audio(path))
    t1 = time.perf_counter()
    fe(chunks, sampling_rate=16000, return_tensors="np")
    return len(chunks), t1 - t0, time.perf_counter() - t1


def pipeline_ours(path, mel_fn):
    """Decode + resample on the host, jitted log-mel on the device: (chunks, decode s, mel s)."""
    import jax

    from mufun_jax import audio

    t0 = time.perf_counter()
    waves = audio.pad_chunks(audio.chunk(audio.load_audio(path)))
    t1 = time.perf_counter()
    mel_fn(jax.device_put(waves)).block_until_ready()
    return len(waves), t1 - t0, time.perf_counter() - t1


def ref_ops(cfg, wd: Path) -> dict:
    """The reference's op (the feature extractor built and warmed up once)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=cfg.whisper.num_mel_bins)
    pipeline_ref(wd / MUSIC, fe)
    return {"pipeline": lambda: pipeline_ref(wd / MUSIC, fe)}


def ours_ops(cfg, wd: Path) -> dict:
    """Our op (the log-mel compiled and warmed up once)."""
    import jax

    from mufun_jax import audio

    mel_fn = jax.jit(lambda w: audio.log_mel_spectrogram(w, cfg.whisper.num_mel_bins))
    pipeline_ours(wd / MUSIC, mel_fn)
    return {"pipeline": lambda: pipeline_ours(wd / MUSIC, mel_fn)}


def results(pipe: dict) -> dict:
    """Chunks/s per side and round, from the ops' (chunks, decode s, mel s)."""
    return {k: {"chunks_per_s": [c / (a + b) for c, a, b in v],
                "decode_resample_chunks_per_s": [c / a for c, a, b in v],
                "mel_chunks_per_s": [c / b for c, a, b in v]} for k, v in pipe.items()}


def rows(inf: dict) -> list[dict]:
    p = inf["pipeline"]
    return [row("input pipeline: decode + resample + log-mel", "chunks/s", p["ours"]["chunks_per_s"],
                p["ref"]["chunks_per_s"]),
            row("input pipeline: log-mel only (device vs WhisperFeatureExtractor)", "chunks/s",
                p["ours"]["mel_chunks_per_s"], p["ref"]["mel_chunks_per_s"])]

