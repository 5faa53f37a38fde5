"""Packed static-shape batches: a packed row computes exactly what each sample computes alone,
shapes never change, too-long samples are skipped or trimmed at chunk boundaries and counted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import FP32_TOL, rel_err
from mufun_jax import audio
from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX as AUDIO, preset
from mufun_jax.data.dataset import Sample, SkipCounter
from mufun_jax.data.packing import PackConfig, expanded_length, pack_batches, shift_labels
from mufun_jax.models import MuFun

CFG = preset("mufun-tiny")


def make_sample(rng, name, n_text, chunks_per_audio):
    ids = list(rng.integers(1, CFG.qwen3.vocab_size, n_text))
    for k, _ in enumerate(chunks_per_audio):
        ids.insert(1 + 2 * k, AUDIO)
    chunks = [[(0.1 * rng.standard_normal(int(rng.integers(8001, audio.CHUNK_SAMPLES)))).astype(np.float32)
               for _ in range(c)] for c in chunks_per_audio]
    labels = [IGNORE_INDEX if t == AUDIO else t for t in ids]
    return Sample(name, ids, labels, chunks)


@pytest.fixture(scope="module")
def model():
    return MuFun(CFG, rngs=nnx.Rngs(3))


@jax.jit
def forward(model, b):
    mel = audio.log_mel_spectrogram(b["waves"])
    return model(b["input_ids"], mel, b["audio_slots"], positions=b["positions"], segment_ids=b["segment_ids"])[0]


def test_packed_row_equals_samples_alone(model):
    rng = np.random.default_rng(0)
    samples = [make_sample(rng, "a", 6, [1]), make_sample(rng, "b", 9, [2]), make_sample(rng, "c", 12, [])]
    packed = list(pack_batches(samples, PackConfig(batch_size=1, seq_len=1000, max_chunks=4)))
    assert len(packed) == 1 and packed[0]["sample_ids"].tolist() == ["a", "b", "c"]
    b = packed[0]
    got = np.asarray(forward(model, {k: jnp.asarray(v) for k, v in b.items() if k != "sample_ids"}))
    for k, s in enumerate(samples, start=1):
        alone = list(pack_batches([s], PackConfig(batch_size=1, seq_len=1000, max_chunks=4, pack=False)))[0]
        want = np.asarray(forward(model, {k2: jnp.asarray(v) for k2, v in alone.items() if k2 != "sample_ids"}))
        n = expanded_length(s, 300)
        seg = b["segment_ids"][0] == k
        assert seg.sum() == n and np.array_equal(b["positions"][0][seg], np.arange(n))
        err = rel_err(got[0][seg], want[0][:n])
        print(f"packed vs alone, sample {s.id}: rel err {err:.2e}")
        assert err <= FP32_TOL


def test_every_slot_points_at_its_own_samples_audio():
    rng = np.random.default_rng(1)
    samples = [make_sample(rng, f"s{i}", 5, [1 + i % 2, 1][: 1 + i % 2]) for i in range(7)]
    for b in pack_batches(samples, PackConfig(batch_size=2, seq_len=1400, max_chunks=5)):
        names = list(b["sample_ids"])
        for r in range(2):
            for k in range(1, b["segment_ids"][r].max() + 1):
                s = {x.id: x for x in samples}[names.pop(0)]
                slots = b["audio_slots"][r][(b["segment_ids"][r] == k) & (b["audio_slots"][r] >= 0)]
                used = sorted(set(slots // 300))
                flat = [c for per_audio in s.chunks for c in per_audio]
                assert len(used) == len(flat)
                for chunk_index, c in zip(used, flat):
                    np.testing.assert_array_equal(b["waves"][chunk_index, :len(c)], c)


def test_shapes_are_static_and_nothing_is_lost():
    rng = np.random.default_rng(2)
    samples = [make_sample(rng, f"s{i}", int(rng.integers(3, 60)), [1] * int(rng.integers(0, 3))) for i in range(25)]
    cfg = PackConfig(batch_size=3, seq_len=1024, max_chunks=6)
    batches = list(pack_batches(samples, cfg))
    shapes = {tuple((k, v.shape) for k, v in sorted(b.items()) if k != "sample_ids") for b in batches}
    assert len(shapes) == 1
    assert sorted(x for b in batches for x in b["sample_ids"]) == sorted(s.id for s in samples)
    assert len(batches) < len(samples) / 3  # packing shares rows


def test_too_long_skip_and_truncate_audio():
    rng = np.random.default_rng(3)
    long = make_sample(rng, "long", 10, [3, 1])  # 1208 tokens, 4 chunks
    ok = make_sample(rng, "ok", 10, [1])
    counter = SkipCounter()
    out = list(pack_batches([long, ok], PackConfig(batch_size=1, seq_len=700, max_chunks=4), counter))
    assert [x for b in out for x in b["sample_ids"]] == ["ok"] and counter == {"too_long": 1}
    counter = SkipCounter()
    out = list(pack_batches([long, ok], PackConfig(batch_size=1, seq_len=700, max_chunks=4,
                                                   too_long="truncate_audio"), counter))
    assert [x for b in out for x in b["sample_ids"]] == ["long", "ok"] and not counter
    assert int(out[0]["chunk_mask"].sum()) == 2  # 3 + 1 chunks trimmed at chunk boundaries to 1 + 1
    assert (out[0]["input_ids"][0] != 0).sum() == 12 + 600 - 2


def test_shift_labels_never_cross_samples():
    labels = np.array([[1, 2, 3, 4, 5, 6, IGNORE_INDEX]])
    seg = np.array([[1, 1, 1, 2, 2, 2, 0]])
    assert shift_labels(labels, seg).tolist() == [[2, 3, IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX]]


def test_an_endless_source_of_unusable_samples_is_an_error_not_a_hang():
    import itertools

    from mufun_jax.data.packing import Packer

    big = Sample("big", [1] * 50, [1] * 50, [])
    packer = Packer(PackConfig(batch_size=1, seq_len=16, max_chunks=1), max_consecutive_skips=10)
    with pytest.raises(ValueError, match=r"(?s)11 samples in a row were skipped.*too_long.*raise seq_len \(now 16\)"):
        packer.next_batch(itertools.repeat(big))
    ok = Sample("ok", [1] * 4, [1] * 4, [])
    packer = Packer(PackConfig(batch_size=1, seq_len=16, max_chunks=1), max_consecutive_skips=10)
    source = iter(([big] * 9 + [ok]) * 5)  # 9 unusable, then a good one, repeatedly: no error
    assert sum(len(b["sample_ids"]) for b in iter(lambda: packer.next_batch(source), None)) == 5
