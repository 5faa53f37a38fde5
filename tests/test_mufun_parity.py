"""Full MuFun logits against the PyTorch reference composition, plus the splice's bad-input errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import FP32_TOL, rel_err
from helpers import jax_mufun_from_torch, random_mel
from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX as AUDIO, RunSettings, preset
from mufun_jax.splice import SpliceSample, collate, expand_placeholders
from mufun_jax.testing.torch_reference import TorchMuFun


@pytest.fixture(scope="module")
def setup(torch_threads):
    cfg = preset("mufun-tiny")
    ref = TorchMuFun(cfg, seed=7)
    rng = np.random.default_rng(0)
    v = cfg.qwen3.vocab_size
    # Sample 0: two one-chunk audios. Sample 1: one two-chunk audio, then text after it.
    ids0 = [*rng.integers(1, v, 5), AUDIO, *rng.integers(1, v, 3), AUDIO, *rng.integers(1, v, 4)]
    ids1 = [*rng.integers(1, v, 2), AUDIO, *rng.integers(1, v, 9)]
    audios = [[random_mel(rng, 1, cfg), random_mel(rng, 1, cfg)], [random_mel(rng, 2, cfg)]]
    samples = [SpliceSample(ids0, [1, 1]), SpliceSample(ids1, [2])]
    return cfg, ref, samples, audios


def run_both(cfg, ref, samples, audios, model, max_length=4096):
    with torch.no_grad():
        want, mask = ref([s.input_ids for s in samples], [[torch.from_numpy(a) for a in aa] for aa in audios],
                         max_length=max_length)
    mel = np.concatenate([a for aa in audios for a in aa])
    batch = collate(samples, num_chunks=mel.shape[0], tokens_per_chunk=cfg.tokens_per_chunk, max_length=max_length,
                    pad_token_id=cfg.pad_token_id)
    got, _ = jax.jit(lambda m, b, x: m(b["input_ids"], x, b["audio_slots"], positions=b["positions"],
                                       segment_ids=b["segment_ids"]))(
        model, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(mel))
    return np.asarray(got), want.numpy(), mask.numpy().astype(bool), batch


def test_mufun_logits_match_reference(setup):
    cfg, ref, samples, audios = setup
    model = jax_mufun_from_torch(ref, cfg)
    got, want, mask, batch = run_both(cfg, ref, samples, audios, model)
    assert got.shape == want.shape
    np.testing.assert_array_equal(batch["segment_ids"].astype(bool), mask)
    assert batch["lengths"].tolist() == [12 + 2 * 300, 11 + 2 * 300]
    err = rel_err(got[mask], want[mask])
    print(f"MuFun fp32 logits rel err {err:.2e}")
    assert err <= FP32_TOL


def test_mufun_truncation_matches_reference(setup):
    """Truncation after splicing keeps the head, as the reference does (here it cuts into the audio)."""
    cfg, ref, samples, audios = setup
    model = jax_mufun_from_torch(ref, cfg)
    got, want, mask, batch = run_both(cfg, ref, samples, audios, model, max_length=450)
    assert batch["input_ids"].shape == (2, 450)
    assert rel_err(got[mask], want[mask]) <= FP32_TOL


def test_mufun_bfloat16_compute(setup):
    """bf16 matmuls (fp32 params) against the fp32 reference. Stated tolerance: 5e-2 x max |torch|,
    and the argmax token agrees on at least 95 % of real positions."""
    cfg, ref, samples, audios = setup
    model = jax_mufun_from_torch(ref, cfg, RunSettings(dtype="bfloat16"))
    got, want, mask, _ = run_both(cfg, ref, samples, audios, model)
    err = rel_err(got[mask], want[mask])
    agree = float(np.mean(got[mask].argmax(-1) == want[mask].argmax(-1)))
    print(f"MuFun bf16 logits rel err {err:.2e}, argmax agreement {agree:.3f}")
    assert err <= 5e-2
    assert agree >= 0.95


def test_audio_slots_carry_ignore_labels():
    ids = [5, AUDIO, 6, 7]
    out_ids, labels, slots = expand_placeholders(ids, [2], tokens_per_chunk=3, chunk_offset=1, labels=[5, 9, 6, 7])
    assert out_ids.tolist() == [5] + [AUDIO] * 6 + [6, 7]
    assert labels.tolist() == [5] + [IGNORE_INDEX] * 6 + [6, 7]
    assert slots.tolist() == [-1, 3, 4, 5, 6, 7, 8, -1, -1]


def test_placeholder_count_must_match_audio_count():
    with pytest.raises(ValueError, match="2 <audio> placeholders.*1 audios"):
        expand_placeholders([1, AUDIO, 2, AUDIO], [1], tokens_per_chunk=300)
    with pytest.raises(ValueError, match="0 <audio> placeholders.*1 audios"):
        expand_placeholders([1, 2], [1], tokens_per_chunk=300)


def test_chunk_counts_must_add_up():
    samples = [SpliceSample([1, AUDIO], [2]), SpliceSample([AUDIO, 3], [1])]
    with pytest.raises(ValueError, match="3 chunks in all, but 4 mel chunks"):
        collate(samples, num_chunks=4, tokens_per_chunk=300, max_length=4096, pad_token_id=0)
    with pytest.raises(ValueError, match="at least one chunk"):
        expand_placeholders([AUDIO], [0], tokens_per_chunk=300)


def test_pad_to_shorter_than_batch_is_an_error():
    with pytest.raises(ValueError, match="pad_to=4"):
        collate([SpliceSample([1, 2, 3, 4, 5])], num_chunks=0, tokens_per_chunk=300, max_length=4096, pad_token_id=0,
                pad_to=4)


def test_mel_and_slots_go_together(setup):
    cfg, ref, *_ = setup
    model = jax_mufun_from_torch(ref, cfg)
    with pytest.raises(ValueError, match="together"):
        model(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 128, 3000)))
