"""The offline demo data: the synthetic dataset is deterministic, well formed and labelled
correctly (checked acoustically with an FFT, not by trusting the generator), and the small BPE
tokenizer trained on it works with the chat template, the label masks and the dataset reader."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mufun_jax.audio import load_audio
from mufun_jax.config import IMAGE_TOKEN_INDEX
from mufun_jax.data.dataset import SkipCounter, iter_samples, read_records
from mufun_jax.data.synth import TASKS, make_dataset
from mufun_jax.data.templates import SYSTEM, get_template, turns_from_conversations
from mufun_jax.data.tokenizer import build_tokenizer, corpus_for, special_ids
from helpers import trained_spans

SR = 16000
N_TRAIN, N_EVAL = 36, 12  # 12 clips per task in train: 3 per timbre, 6 per register / notes class


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    info = make_dataset(out, n_train=N_TRAIN, n_eval=N_EVAL, seed=3)
    return out, info


@pytest.fixture(scope="module")
def tok(data, tmp_path_factory):
    out, info = data
    return build_tokenizer(corpus_for(read_records(info["train"])), tmp_path_factory.mktemp("tok"), vocab_size=512)


@pytest.fixture(scope="module")
def clips(data):
    """(record, 16 kHz waveform) for every train and eval record."""
    out, info = data
    return [(r, load_audio(out / r["audio"])) for split in ("train", "eval") for r in read_records(info[split])]


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- dataset -----------------------------------------------------------------------------------


def test_deterministic_for_a_seed(tmp_path):
    a = make_dataset(tmp_path / "a", n_train=9, n_eval=3, seed=7)
    make_dataset(tmp_path / "b", n_train=9, n_eval=3, seed=7)
    make_dataset(tmp_path / "c", n_train=9, n_eval=5, seed=7)
    make_dataset(tmp_path / "d", n_train=9, n_eval=3, seed=8)
    fa, fb, fc, fd = (files(tmp_path / k) for k in "abcd")
    assert fa == fb and len(fa) == 9 + 3 + 2
    # train does not depend on the eval size; another seed gives other audio
    assert all(fc[k] == v for k, v in fa.items() if k.startswith(("train", "audio/train")))
    assert all(fd[k] != v for k, v in fa.items() if k.startswith("audio/"))
    assert not list((tmp_path / "a").rglob("*.tmp"))
    assert a["n_train"] == 9 and a["n_eval"] == 3


def test_records_follow_the_mufun_schema(data):
    out, info = data
    questions = {task: (q, set(answers)) for task, q, answers in info["questions"]}
    assert set(questions) == set(TASKS)
    assert len({a for _, answers in questions.values() for a in answers}) <= 10
    for split, n in (("train", N_TRAIN), ("eval", N_EVAL)):
        records = json.loads(Path(info[split]).read_text())
        assert len(records) == n == info[f"n_{split}"]
        assert [r["id"] for r in records] == [f"{split}-{i:05d}" for i in range(1, n + 1)]
        for r in records:
            assert set(r) == {"id", "audio", "conversations", "answer", "task"}
            assert r["audio"] == f"audio/{r['id']}.wav" and (out / r["audio"]).is_file()
            q, answers = questions[r["task"]]
            assert r["conversations"] == [{"from": "human", "value": "<audio>\n" + q},
                                          {"from": "gpt", "value": r["answer"]}]
            assert r["answer"] in answers


def test_tasks_and_classes_are_balanced(data):
    _, info = data
    records = read_records(info["train"])
    tasks = Counter(r["task"] for r in records)
    assert set(tasks.values()) == {N_TRAIN // len(TASKS)}
    for task in TASKS:
        per_answer = Counter(r["answer"] for r in records if r["task"] == task)
        assert len(per_answer) == len(TASKS[task][1]) and max(per_answer.values()) - min(per_answer.values()) <= 1
    assert [r["task"] for r in records] != sorted(r["task"] for r in records)  # shuffled, not in blocks


def test_audio_decodes_at_16k_with_the_stated_duration(data, clips):
    peaks = []
    for r, x in clips:
        assert x.dtype == np.float32 and x.ndim == 1
        assert 1.5 <= len(x) / SR <= 3.0, (r["id"], len(x))
        peaks.append(np.max(np.abs(x)))
    assert 0.44 < min(peaks) and max(peaks) < 0.6  # one level for every clip (+ noise), no clipping


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.abs(np.fft.rfft(x * np.hanning(len(x)))), np.fft.rfftfreq(len(x), 1 / SR)


def amp_near(spec, freqs, f: float, rel: float = 0.02) -> float:
    band = (freqs > f * (1 - rel)) & (freqs < f * (1 + rel))
    return float(spec[band].max())


def dominant_hz(x: np.ndarray) -> float:
    spec, freqs = spectrum(x)
    return float(freqs[np.argmax(spec)])


def top_peaks_hz(x: np.ndarray, n: int) -> list[float]:
    spec, freqs = spectrum(x)
    is_peak = (spec[1:-1] > spec[:-2]) & (spec[1:-1] >= spec[2:])
    idx = np.nonzero(is_peak)[0] + 1
    return sorted(float(freqs[i]) for i in idx[np.argsort(spec[idx])[-n:]])


def decay_ratio(x: np.ndarray) -> float:
    """RMS of the last quarter over RMS of the first (fades excluded)."""
    q = len(x) // 4
    core = slice(int(0.02 * SR), len(x) - int(0.06 * SR))
    x = x[core]
    return float(np.sqrt(np.mean(x[-q // 2:] ** 2)) / np.sqrt(np.mean(x[:q // 2] ** 2)))


def test_timbre_labels_match_the_harmonics(clips):
    seen = Counter()
    for r, x in clips:
        if r["task"] != "instrument":
            continue
        f0 = dominant_hz(x)
        assert 140 < f0 < 620, (r["id"], f0)
        spec, freqs = spectrum(x)
        h1, h2, h3 = (amp_near(spec, freqs, k * f0) for k in (1, 2, 3))
        h2, h3 = h2 / h1, h3 / h1
        d = decay_ratio(x)
        label = {"A sine wave.": "sine", "A square wave.": "square", "A sawtooth wave.": "sawtooth",
                 "A plucked string.": "pluck"}[r["answer"]]
        seen[label] += 1
        if label == "pluck":
            assert d < 0.2, (r["id"], d)
            continue
        assert d > 0.8, (r["id"], label, d)  # sustained
        if label == "sine":
            assert h2 < 0.02 and h3 < 0.02, (r["id"], h2, h3)
        elif label == "square":  # odd harmonics at 1/k
            assert h2 < 0.02 and 0.2 < h3 < 0.45, (r["id"], h2, h3)
        else:  # every harmonic at 1/k
            assert 0.35 < h2 < 0.7 and 0.2 < h3 < 0.45, (r["id"], h2, h3)
    assert set(seen) == {"sine", "square", "sawtooth", "pluck"}


def test_register_labels_match_the_fundamental(clips):
    seen = Counter()
    for r, x in clips:
        if r["task"] == "register":
            f0 = dominant_hz(x)
            high = r["answer"] == "The pitch is high."
            assert (f0 > 700) if high else (f0 < 300), (r["id"], r["answer"], f0)
            seen[high] += 1
    assert set(seen) == {True, False}


def test_notes_labels_match_the_pitches(clips):
    """A chord's three strongest partials are its root, third and fifth (0, 3 or 4, 7 semitones); a
    single sawtooth note's are its first three harmonics (0, 12, 19)."""
    seen = Counter()
    for r, x in clips:
        if r["task"] == "notes":
            peaks = top_peaks_hz(x, 3)
            semis = [12 * np.log2(f / peaks[0]) for f in peaks]
            chord = r["answer"] == "It is a chord."
            wants = [(0, 4, 7), (0, 3, 7)] if chord else [(0, 12, 19.02)]
            assert any(np.allclose(semis, w, atol=0.2) for w in wants), (r["id"], r["answer"], peaks, semis)
            assert 190 < peaks[0] < 410
            seen[chord] += 1
    assert set(seen) == {True, False}


@pytest.mark.parametrize("kw, match", [(dict(n_train=-1, n_eval=1), "n_train"), (dict(n_train=1, n_eval=2.0), "n_eval"),
                                       (dict(n_train=1, n_eval=1, duration=(3, 2)), "duration"),
                                       (dict(n_train=1, n_eval=1, duration=(0.1, 2)), "0.1")])
def test_bad_arguments_name_the_value(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_dataset(tmp_path, **kw)


# -- tokenizer ---------------------------------------------------------------------------------


def test_tokenizer_specials_and_size(tok, tmp_path):
    assert special_ids(tok) == {"endoftext": 0, "im_start": 1, "im_end": 2}
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == tok.pad_token_id == 0
    assert 259 < len(tok) <= 512
    for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(s, add_special_tokens=False).input_ids) == 1
    assert tok("hello", add_special_tokens=True).input_ids == tok("hello", add_special_tokens=False).input_ids  # no BOS
    small = build_tokenizer(["a b c d e f g"] * 3 + [SYSTEM], tmp_path, vocab_size=300)
    assert len(small) <= 300
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(["x"], tmp_path, vocab_size=100)


def test_tokenizer_round_trips_and_is_compact(tok):
    for text in (SYSTEM, "A plucked string.<|im_end|>", "Unseen words: Ünïcödé 音乐, tabs\tand\nnewlines  ."):
        assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text
    assert len(tok(SYSTEM).input_ids) <= 35  # the prompt was in the training text: roughly a token a word


def test_labels_cover_exactly_the_answer_and_end_token(data, tok):
    _, info = data
    tpl = get_template("qwen2_instruct")
    for r in read_records(info["eval"]):
        ids, labels = tpl.encode(turns_from_conversations(r["conversations"]), tok)
        assert ids.count(IMAGE_TOKEN_INDEX) == 1
        spans = trained_spans(ids, labels)
        assert len(spans) == 1 and spans[0][-1] == 2
        assert tok.decode(spans[0]) == " " + r["answer"] + "<|im_end|>"


def test_corpus_for_rejects_a_bad_record():
    with pytest.raises(ValueError, match="record 1"):
        corpus_for([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, "oops"])


def test_every_record_reaches_the_dataset_reader(data, tok):
    out, info = data
    for split in ("train", "eval"):
        records = read_records(info[split])
        counter = SkipCounter()
        samples = list(iter_samples(records, template=get_template("qwen2_instruct"), tokenizer=tok,
                                    audio_root=out, counter=counter))
        assert not counter, counter.report()
        assert [s.id for s in samples] == [r["id"] for r in records]
        for s, r in zip(samples, records):
            assert s.chunks_per_audio == [1]
            assert np.array_equal(s.chunks[0][0], load_audio(out / r["audio"]))
