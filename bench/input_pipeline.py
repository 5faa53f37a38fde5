#!/usr/bin/env python3
"""Benchmark (not a test): input-pipeline throughput on this host.

Reports 30 s chunks per second on one host core for
- decode + resample to 16 kHz (mp3 and flac at 44.1 kHz stereo, and wav at 16 kHz),
- the log-mel step: our JAX function jitted on the CPU backend, against transformers'
  WhisperFeatureExtractor (numpy path). On an accelerator the same jitted function runs inside
  the training step; run this script there to get the device number.

    taskset -c 0 python bench/input_pipeline.py [--chunks 8]     # one core
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=8, help="30 s chunks per measurement")
    args = ap.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import soundfile as sf
    from transformers import WhisperFeatureExtractor

    from mufun_jax import audio

    n = args.chunks
    rng = np.random.default_rng(0)
    t = np.arange(44100 * 30 * n) / 44100
    music = 0.2 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.standard_normal(t.size)
    stereo = np.stack([music, 0.8 * music], 1).astype(np.float32)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        sf.write(f"{d}/a.mp3", stereo, 44100)
        sf.write(f"{d}/a.flac", stereo, 44100)
        sf.write(f"{d}/a.wav", audio.resample(music.astype(np.float32), 44100), 16000)
        for name in ("a.mp3", "a.flac", "a.wav"):
            t0 = time.perf_counter()
            chunks = audio.chunk(audio.load_audio(f"{d}/{name}"))
            dt = time.perf_counter() - t0
            rows.append((f"decode+resample {name[2:]}", len(chunks) / dt))
    waves = audio.pad_chunks(chunks)
    mel = jax.jit(audio.log_mel_spectrogram)
    mel(waves).block_until_ready()
    t0 = time.perf_counter()
    for _ in range(3):
        mel(waves).block_until_ready()
    rows.append((f"log-mel JAX ({jax.default_backend()}, jit)", 3 * len(waves) / (time.perf_counter() - t0)))
    fe = WhisperFeatureExtractor(feature_size=128)
    t0 = time.perf_counter()
    fe(list(waves), sampling_rate=16000, return_tensors="np")
    rows.append(("log-mel WhisperFeatureExtractor", len(waves) / (time.perf_counter() - t0)))
    print(f"host: {os.cpu_count()} cores; jax {jax.__version__} on {jax.devices()[0].device_kind}")
    print(f"{'step':42s}{'chunks/s':>10s}")
    for name, rate in rows:
        print(f"{name:42s}{rate:10.1f}")


if __name__ == "__main__":
    main()
