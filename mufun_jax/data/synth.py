"""A tiny synthetic music-understanding dataset, rendered with numpy, for offline demos and tests.

The real MuFun data cannot be downloaded in a sealed environment, and a small randomly
initialised model cannot learn it in a few hundred CPU steps anyway. These clips ask questions
whose answers are acoustically obvious (timbre, register, one note or a chord), drawn from a handful of
fixed strings, so a training run visibly learns something and its answers can be scored by exact
match. Records use MuFun's training schema, so the real data pipeline reads them unchanged.

Every clip has the same peak level (within +-10 %) and light white noise; tones are band-limited
(additive synthesis below 7.5 kHz), so they do not alias. A random gain per clip would be the
largest variation in a randomly initialised encoder's features, a nuisance the demo's few minutes
of training do not learn to ignore (instrument accuracy then ranged from 31 % to 100 % between
otherwise equal runs).

The third task asks whether one note or a chord sounds. The demo asked about chord quality (major
or minor) before; it was never learnt (exactly chance in every run), because its cue is a
one-semitone shift of one note under a root that moves over an octave: with sine tones the two
thirds are 12-24 Hz apart, under half a bin of Whisper's 25 ms STFT (a linear probe on the log-mel
reaches 67 %), and even with harmonic-rich tones, where the cue is resolved (probe 99.5 %), the tiny
model did not pick it up in its few hundred steps (see the demo notes in the README).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np

SAMPLE_RATE = 16000
MAX_PARTIAL_HZ = 7500.0  # keep every partial below Nyquist (8 kHz)

# task -> (question, {class: answer}); the order of classes is the order they are cycled in.
TASKS: dict[str, tuple[str, dict[str, str]]] = {
    "instrument": ("What instrument is playing?", {
        "sine": "A sine wave.",
        "square": "A square wave.",
        "sawtooth": "A sawtooth wave.",
        "pluck": "A plucked string.",
    }),
    "register": ("Is the pitch high or low?", {
        "high": "The pitch is high.",
        "low": "The pitch is low.",
    }),
    "notes": ("Is it a single note or a chord?", {
        "single": "It is a single note.",
        "chord": "It is a chord.",
    }),
}

INSTRUMENT_HZ = (150.0, 600.0)  # f0 range for the timbre task
LOW_HZ = (100.0, 220.0)  # register task: a gap of two octaves between the classes
HIGH_HZ = (800.0, 1800.0)
CHORD_ROOT_HZ = (200.0, 400.0)
CHORD_SEMITONES = ((0, 4, 7), (0, 3, 7))  # a major or a minor triad
GAIN = (0.45, 0.55)  # peak amplitude of the clip before noise
NOISE = (0.002, 0.01)  # white-noise std relative to the peak amplitude


def _log_uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _partials(t: np.ndarray, f0: float, amp_of_k, decay_of_k=None) -> np.ndarray:
    """Sum of harmonics k * f0 below MAX_PARTIAL_HZ with amplitudes ``amp_of_k(k)`` (0 skips one)
    and, for a pluck, per-harmonic exponential decay rates ``decay_of_k(k)`` in 1/s."""
    x = np.zeros_like(t)
    for k in range(1, int(MAX_PARTIAL_HZ // f0) + 1):
        a = amp_of_k(k)
        if a == 0.0:
            continue
        p = a * np.sin(2 * np.pi * k * f0 * t)
        if decay_of_k is not None:
            p *= np.exp(-decay_of_k(k) * t)
        x += p
    return x


def tone(timbre: str, f0: float, t: np.ndarray) -> np.ndarray:
    """One note of ``timbre`` (sine, square, sawtooth or pluck) at ``f0`` Hz, not normalised."""
    if timbre == "sine":
        return np.sin(2 * np.pi * f0 * t)
    if timbre == "square":  # odd harmonics only, 1/k
        return _partials(t, f0, lambda k: 1.0 / k if k % 2 else 0.0)
    if timbre == "sawtooth":  # every harmonic, 1/k
        return _partials(t, f0, lambda k: 1.0 / k)
    if timbre == "pluck":  # bright attack, higher harmonics die faster, near silence by the end
        return _partials(t, f0, lambda k: 1.0 / k, lambda k: 3.0 + 1.5 * k)
    raise ValueError(f"unknown timbre {timbre!r}; expected one of {list(TASKS['instrument'][1])}")


def _envelope(n: int) -> np.ndarray:
    """10 ms attack and 50 ms release, so that clip edges do not click."""
    env = np.ones(n)
    a, r = int(0.01 * SAMPLE_RATE), int(0.05 * SAMPLE_RATE)
    env[:a] = np.linspace(0.0, 1.0, a, endpoint=False)
    env[n - r:] *= np.linspace(1.0, 0.0, r)
    return env


def render_clip(task: str, label: str, n_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A float32 clip of ``n_samples`` at 16 kHz whose answer to ``task`` is ``label``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")
    if label not in TASKS[task][1]:
        raise ValueError(f"unknown label {label!r} for task {task!r}; expected one of {list(TASKS[task][1])}")
    t = np.arange(n_samples) / SAMPLE_RATE
    if task == "instrument":
        x = tone(label, _log_uniform(rng, INSTRUMENT_HZ), t)
    elif task == "register":
        timbre = str(rng.choice(list(TASKS["instrument"][1])))  # the register must not follow the timbre
        x = tone(timbre, _log_uniform(rng, HIGH_HZ if label == "high" else LOW_HZ), t)
    else:  # notes: one sawtooth note, or a root-position triad of them (major or minor)
        root = _log_uniform(rng, CHORD_ROOT_HZ)
        steps = CHORD_SEMITONES[int(rng.integers(2))] if label == "chord" else (0,)
        x = sum(tone("sawtooth", root * 2 ** (s / 12), t) for s in steps)
    x = x * _envelope(n_samples)
    peak = rng.uniform(*GAIN)
    x = x * (peak / np.max(np.abs(x)))
    x = x + rng.normal(0.0, peak * rng.uniform(*NOISE), n_samples)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def _balanced_plan(n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """n (task, label) pairs: tasks cycle evenly, and each task's labels cycle evenly; then shuffled."""
    counts = dict.fromkeys(TASKS, 0)
    plan = []
    names = list(TASKS)
    for i in range(n):
        task = names[i % len(names)]
        labels = list(TASKS[task][1])
        plan.append((task, labels[counts[task] % len(labels)]))
        counts[task] += 1
    order = rng.permutation(n)
    return [plan[j] for j in order]


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _write_wav_atomic(path: Path, x: np.ndarray) -> None:
    import soundfile as sf

    tmp = path.with_name(path.name + ".tmp")
    sf.write(str(tmp), x, SAMPLE_RATE, format="WAV", subtype="PCM_16")
    os.replace(tmp, path)


def _split(out_dir: Path, split: str, n: int, rng: np.random.Generator,
           duration: tuple[float, float]) -> list[dict]:
    records = []
    for i, (task, label) in enumerate(_balanced_plan(n, rng), 1):
        sample_id = f"{split}-{i:05d}"
        n_samples = int(round(rng.uniform(*duration) * SAMPLE_RATE))
        rel = f"audio/{sample_id}.wav"
        _write_wav_atomic(out_dir / rel, render_clip(task, label, n_samples, rng))
        question, answers = TASKS[task]
        records.append({
            "id": sample_id,
            "audio": rel,
            "conversations": [{"from": "human", "value": f"<audio>\n{question}"},
                              {"from": "gpt", "value": answers[label]}],
            "answer": answers[label],
            "task": task,
        })
    _write_json_atomic(out_dir / f"{split}.json", records)
    return records


def make_dataset(out_dir: str | Path, *, n_train: int, n_eval: int, seed: int = 0,
                 duration: Sequence[float] = (1.5, 3.0)) -> dict:
    """Write ``out_dir/audio/*.wav`` (16 kHz mono PCM16) and ``out_dir/{train,eval}.json``.

    The same arguments give the same bytes. Train and eval draw from independent streams of
    ``seed``, so changing ``n_eval`` does not change the training clips. Returns the paths, the
    counts and ``questions``: ``[(task, question, [answers])]`` for scoring.
    """
    for name, n in (("n_train", n_train), ("n_eval", n_eval)):
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"{name} must be a non-negative int; got {n!r}")
    if len(duration) != 2 or not 0 < float(duration[0]) <= float(duration[1]) <= 30:
        raise ValueError(f"duration={tuple(duration)!r} must be (min, max) seconds with 0 < min <= max <= 30")
    lo, hi = float(duration[0]), float(duration[1])
    if lo < 0.2:
        raise ValueError(f"duration min {lo} s is too short for the 60 ms fade envelope; use at least 0.2 s")
    out_dir = Path(out_dir)
    (out_dir / "audio").mkdir(parents=True, exist_ok=True)
    streams = np.random.SeedSequence(seed).spawn(2)
    train = _split(out_dir, "train", n_train, np.random.default_rng(streams[0]), (lo, hi))
    evals = _split(out_dir, "eval", n_eval, np.random.default_rng(streams[1]), (lo, hi))
    return {
        "out_dir": str(out_dir),
        "audio_dir": str(out_dir / "audio"),
        "train": str(out_dir / "train.json"),
        "eval": str(out_dir / "eval.json"),
        "n_train": len(train),
        "n_eval": len(evals),
        "sample_rate": SAMPLE_RATE,
        "questions": [(task, q, list(answers.values())) for task, (q, answers) in TASKS.items()],
    }
