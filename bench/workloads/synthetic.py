"""The synthetic workload of bench/compare.py and its analytic FLOPs: clips rendered with numpy,
training samples of random prompt and answer tokens around one ``<audio>``, the useful and the
computed FLOPs of a step or an answer, and the packing our side trains with (chosen by those FLOPs).
Both sides draw the same samples from the same seeds."""

from __future__ import annotations

import math

import numpy as np

from .settings import Settings


# -- synthetic data ---------------------------------------------------------------------------------


def synth_wave(rng: np.random.Generator, seconds: float) -> np.ndarray:
    """A 16 kHz clip: two tones and a little noise."""
    n = int(seconds * 16000)
    t = np.arange(n, dtype=np.float32) / np.float32(16000)
    f1, f2 = rng.uniform(80, 1000, 2).astype(np.float32)
    x = 0.2 * np.sin(np.float32(2 * np.pi) * f1 * t) + 0.1 * np.sin(np.float32(2 * np.pi) * f2 * t)
    return (x + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)


def make_samples(s: Settings, n: int, seed: int, *, audio: bool = True) -> list:
    """``n`` training samples: one clip each (its 30 s waveform chunks; with ``audio=False`` 1-sample
    stand-ins, for packing simulations), prompt tokens around one -200, answer tokens as labels."""
    from mufun_jax import audio as audio_lib
    from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX
    from mufun_jax.data.dataset import Sample

    rng = np.random.default_rng(seed)
    vocab = s.qwen3["vocab_size"]
    out = []
    for i in range(n):
        secs = float(rng.uniform(*s.clip_s))
        p = int(rng.integers(s.prompt_tokens[0], s.prompt_tokens[1] + 1))
        a = int(rng.integers(s.answer_tokens[0], s.answer_tokens[1] + 1))
        q = [int(x) for x in rng.integers(3, vocab, p)]
        ans = [int(x) for x in rng.integers(3, vocab, a)]
        cut = int(rng.integers(p // 2, p + 1))
        ids = q[:cut] + [IMAGE_TOKEN_INDEX] + q[cut:] + ans
        labels = [IGNORE_INDEX] * (p + 1) + ans
        if audio:
            chunks = audio_lib.chunk(synth_wave(rng, secs))
        else:  # the chunk count of such a clip, without rendering it
            full = int(secs * 16000)
            k = max(1, math.ceil(full / audio_lib.CHUNK_SAMPLES))
            if k > 1 and full - (k - 1) * audio_lib.CHUNK_SAMPLES <= audio_lib.MIN_TAIL_SAMPLES:
                k -= 1
            chunks = [np.zeros(1, np.float32)] * k
        out.append(Sample(f"s{seed}-{i}", ids, labels, [list(chunks)]))
    return out


def label_tokens(samples) -> int:
    return sum(sum(1 for t in s.labels if t >= 0) for s in samples)


# -- analytic FLOPs ---------------------------------------------------------------------------------


# The formulas are mufun_jax.flops (shared with the AOT reports); "useful" FLOPs count each sample's
# own tokens (no padding) and the causal triangle of its attention.

TRAINABLE = {"full": {"whisper": "full", "connector": "full", "llm": "full"},
             "warmup": {"whisper": "frozen", "connector": "full", "llm": "frozen"}}


def expanded(cfg, smp) -> int:
    return len(smp.input_ids) - len(smp.chunks) + cfg.tokens_per_chunk * sum(smp.chunks_per_audio)


def train_flops(cfg, samples, mode: str) -> float:
    """Useful training FLOPs of ``samples`` (no padding). ``mode``: full | warmup (connector only)."""
    from mufun_jax import flops

    return sum(flops.train_flops(cfg, TRAINABLE[mode], sum(x.chunks_per_audio), [expanded(cfg, x)]) for x in samples)


def computed_train_flops(cfg, chunks: int, rows: int, seq_len: int, mode: str = "full") -> float:
    """FLOPs of one step as computed, padding included: ``chunks`` chunks through the encoder and
    ``rows`` x ``seq_len`` tokens through the LLM, attention over every row's whole square (a packed
    row's segment mask and a padded batch's attention mask both leave the full square computed).
    Remat recomputation is not included."""
    from mufun_jax import flops

    return flops.train_flops(cfg, TRAINABLE[mode], chunks, [seq_len] * rows, attention="square")


def infer_flops(cfg, n_chunks: int, prompt_len: int, new_tokens: int) -> float:
    """Useful FLOPs of one answer: encoder, connector, prefill (the head on the last position only),
    then one decode step per generated token after the first."""
    from mufun_jax import flops

    return flops.answer_flops(cfg, n_chunks, prompt_len, new_tokens)


def choose_packing(s: Settings, cfg) -> tuple[tuple[int, int, int], list]:
    """The (rows, seq_len, max_chunks) of ``s.pack_grid`` with the fewest computed FLOPs per sample
    on this dataset's length mix (a 64-sample draw that is not the timed one)."""
    from mufun_jax.data.packing import PackConfig, pack_batches

    samples = make_samples(s, 64, s.seed + 7, audio=False)
    longest = max(expanded(cfg, x) for x in samples)
    most = max(sum(x.chunks_per_audio) for x in samples)
    table = []
    for r, t, c in s.pack_grid:
        if t < longest or c < most:
            continue
        batches = list(pack_batches(samples, PackConfig(batch_size=r, seq_len=t, max_chunks=c)))
        table.append(((r, t, c), len(batches) * computed_train_flops(cfg, c, r, t) / len(samples)))
    table.sort(key=lambda x: x[1])
    return table[0][0], table

