"""Attention backends of mufun_jax.models.attention on CPU, fp32.

The TPU splash kernel runs in Pallas interpret mode (the same kernel code, evaluated by XLA on
CPU). Padding query rows (segment 0) are don't-care, so comparisons use only rows with a
non-zero segment; every backend must still give finite values there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import rel_err
from mufun_jax.models import attention as attn
from mufun_jax.models.attention import dot_product_attention

KERNEL_TOL = 1e-5  # max |pallas - xla| <= 1e-5 x max |xla| (fp32; different summation order only)


def _qkv(rng, b, t, heads, kv_heads, d, s=None):
    s = t if s is None else s
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kv_heads, d)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _packed_segments(rng, b, t, n_seg=3):
    """Each row: n_seg segments of random lengths, then right padding (segment 0)."""
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        cuts = np.sort(rng.choice(np.arange(8, t - 8), size=n_seg, replace=False))
        start = 0
        for sid, end in enumerate(cuts, start=1):
            seg[i, start:end] = sid
            start = end
    return jnp.asarray(seg)


def _naive(q, k, v, seg, causal):
    """Per sample, per head, per query: masked softmax over an explicit list of visible keys (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    out = np.full((b, t, n, d), np.nan)
    for bi in range(b):
        for h in range(n):
            kh = h // (n // kvh)  # GQA: consecutive query heads share a kv head
            for i in range(t):
                keys = [j for j in range(s)
                        if (not causal or j <= i) and (seg is None or (seg[bi, j] == seg[bi, i] and seg[bi, j] != 0))]
                if not keys:
                    continue  # padding row: don't-care
                logits = np.array([q[bi, i, h] @ k[bi, j, kh] for j in keys]) / np.sqrt(d)
                p = np.exp(logits - logits.max())
                out[bi, i, h] = (p / p.sum()) @ v[bi, keys, kh]
    return out


def _valid(seg, shape):
    """Boolean (b, t, 1, 1) selector of non-padding query rows, broadcast to ``shape``."""
    return np.broadcast_to(np.asarray(seg)[:, :, None, None] != 0, shape)


@pytest.mark.parametrize("causal,packed", [(True, True), (False, True), (False, False)])
def test_xla_matches_naive_loop(causal, packed):
    rng = np.random.default_rng(0)
    b, t, heads, kv_heads, d = 2, 40, 4, 2, 16
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t) if packed else None
    out = np.asarray(dot_product_attention(q, k, v, segment_ids=seg, causal=causal))
    ref = _naive(q, k, v, None if seg is None else np.asarray(seg), causal)
    assert np.isfinite(out).all()
    keep = _valid(seg, out.shape) if packed else np.ones(out.shape, bool)
    assert packed == (not keep.all())  # the packed case really has padding rows
    err = rel_err(out[keep], ref[keep])
    assert err < 1e-6, err
    if packed:  # qwen3 semantics for padding rows: every key masked at -1e30 -> uniform over all keys
        v_mean = np.repeat(np.asarray(v).mean(axis=1, keepdims=True), heads // kv_heads, axis=2)
        pad = ~keep[:, :, 0, 0]
        np.testing.assert_allclose(out[pad], np.broadcast_to(v_mean, out.shape)[pad], atol=1e-6)


@pytest.mark.parametrize("block", [16, 13, 40])
def test_xla_causal_query_blocks_match_naive_loop(block):
    """The xla backend's causal query blocks (keys only up to each block's last query), with a
    partial last block and segment boundaries inside blocks, equal the full masked square."""
    rng = np.random.default_rng(1)
    b, t, heads, kv_heads, d = 2, 40, 4, 2, 16
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t)
    out = np.asarray(attn._xla_attention(q, k, v, seg, True, block=block))
    ref = _naive(q, k, v, np.asarray(seg), True)
    keep = _valid(seg, out.shape)
    assert np.isfinite(out).all() and not keep.all()
    assert rel_err(out[keep], ref[keep]) < 1e-6
    full = np.asarray(attn._xla_attention(q, k, v, seg, True, block=t))
    assert rel_err(out[keep], full[keep]) < 1e-6


@pytest.mark.parametrize("t", [256, 200])
def test_pallas_interpret_matches_xla_causal_packed_gqa(t):
    rng = np.random.default_rng(1)
    b, heads, kv_heads, d = 2, 4, 2, 64
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t)
    ref = np.asarray(dot_product_attention(q, k, v, segment_ids=seg, causal=True, implementation="xla"))
    for impl in ("pallas_tpu", "splash"):
        out = np.asarray(jax.jit(lambda *a: dot_product_attention(  # noqa: B023
            *a, segment_ids=seg, causal=True, implementation=impl, interpret=True))(q, k, v))
        assert out.shape == ref.shape and np.isfinite(out).all()
        keep = _valid(seg, out.shape)
        err = rel_err(out[keep], ref[keep])
        assert err < KERNEL_TOL, (impl, t, err)


@pytest.mark.parametrize("t", [300, 1500])
def test_pallas_interpret_full_mask_whisper_like(t):
    """Non-causal, no segments, lengths that are not a multiple of 128 (kernel pads keys, masks them)."""
    rng = np.random.default_rng(2)
    b, heads, d = 2, 4, 64
    q, k, v = _qkv(rng, b, t, heads, heads, d)
    ref = np.asarray(dot_product_attention(q, k, v, causal=False))
    out = np.asarray(jax.jit(lambda *a: dot_product_attention(
        *a, causal=False, implementation="pallas_tpu", interpret=True))(q, k, v))
    assert out.shape == (b, t, heads, d) and np.isfinite(out).all()
    err = rel_err(out, ref)
    assert err < KERNEL_TOL, (t, err)


def test_splash_padding_and_blocks():
    assert attn.splash_block(1500) == (1536, 512)
    assert attn.splash_block(300) == (384, 128)
    assert attn.splash_block(256) == (256, 256)
    assert attn.splash_block(4096) == (4096, 512)
    assert attn.splash_block(640) == (640, 128)


def test_pallas_interpret_gradients_match_xla():
    rng = np.random.default_rng(3)
    b, t, heads, kv_heads, d = 2, 256, 4, 2, 64
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t)
    # Cotangent is zero on padding rows (their outputs are don't-care and differ by design).
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32) * _valid(seg, q.shape))

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(w * dot_product_attention(
            q, k, v, segment_ids=seg, causal=True, implementation=impl, interpret=True))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, g, g_ref in zip("qkv", grads("pallas_tpu"), grads("xla")):
        g, g_ref = np.asarray(g), np.asarray(g_ref)
        assert np.isfinite(g).all() and np.abs(g_ref).max() > 0
        err = rel_err(g, g_ref)
        assert err < KERNEL_TOL, (name, err)


def test_cudnn_argument_plumbing():
    """The arguments built for cuDNN give the xla result when jax's own xla backend runs them."""
    rng = np.random.default_rng(4)
    b, t, heads, kv_heads, d = 2, 64, 4, 2, 16
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t)
    ref = np.asarray(dot_product_attention(q, k, v, segment_ids=seg, causal=True))
    out = np.asarray(jax.nn.dot_product_attention(**attn.cudnn_arguments(q, k, v, seg, True), implementation="xla"))
    assert np.isfinite(out).all()
    keep = _valid(seg, out.shape)
    assert rel_err(out[keep], ref[keep]) < 1e-6
    # Whisper-like: no mask at all, plain non-causal.
    args = attn.cudnn_arguments(q, k, v, None, False)
    assert args["mask"] is None and args["is_causal"] is False
    out = jax.nn.dot_product_attention(**args, implementation="xla")
    assert rel_err(out, dot_product_attention(q, k, v, causal=False)) < 1e-6


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the CPU error path")
def test_cudnn_on_cpu_raises_clearly():
    q, k, v = _qkv(np.random.default_rng(5), 1, 8, 2, 2, 8)
    with pytest.raises(ValueError, match="GPU"):
        dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                              causal=True, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() == "tpu", reason="checks the non-TPU error path")
def test_pallas_without_interpret_off_tpu_raises():
    q, k, v = _qkv(np.random.default_rng(6), 1, 128, 2, 2, 64)
    with pytest.raises(ValueError, match="interpret=True"):
        dot_product_attention(q, k, v, causal=True, implementation="pallas_tpu")


def test_unknown_implementation_raises():
    q, k, v = _qkv(np.random.default_rng(7), 1, 8, 2, 1, 8)
    with pytest.raises(ValueError, match="valid: xla, blocked, pallas_tpu, splash, cudnn"):
        dot_product_attention(q, k, v, causal=True, implementation="flash")


# -- the blocked backend (plain JAX, recomputing backward) ------------------------------------------


@pytest.mark.parametrize("causal,packed,t,block", [(True, True, 40, 16), (False, True, 40, 13), (False, False, 40, 16),
                                                   (False, False, 37, 8), (True, False, 33, 32)])
def test_blocked_matches_naive_loop_and_xla_gradients(causal, packed, t, block):
    """Forward against the float64 loop, and gradients of a loss over the real rows against the xla
    backend's: partial last blocks, segment boundaries inside blocks, GQA (4 query / 2 kv heads)."""
    from mufun_jax.models.blocked_attention import blocked_attention

    rng = np.random.default_rng(3)
    b, heads, kv_heads, d = 2, 4, 2, 16
    q, k, v = _qkv(rng, b, t, heads, kv_heads, d)
    seg = _packed_segments(rng, b, t) if packed else None

    def blocked(q, k, v):
        qh, kh, vh = attn._heads_first(q, k, v)
        return jnp.swapaxes(blocked_attention(qh, kh, vh, seg, causal, block), 1, 2)

    out = np.asarray(blocked(q, k, v))
    ref = _naive(q, k, v, None if seg is None else np.asarray(seg), causal)
    keep = _valid(seg, out.shape) if packed else np.ones(out.shape, bool)
    assert np.isfinite(out).all()
    assert rel_err(out[keep], ref[keep]) < 1e-6
    w = jnp.asarray(rng.normal(size=out.shape).astype(np.float32)) * jnp.asarray(keep)  # real rows only
    grads = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)
    want = grads(lambda *a: dot_product_attention(*a, segment_ids=seg, causal=causal, implementation="xla"))
    for g, r in zip(grads(blocked), want):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, r) < 1e-5


def test_blocked_backend_in_the_models_matches_xla():
    """attention_impl=blocked in Whisper (no mask, the scan schedule) and Qwen3 (causal packed rows):
    the same logits and parameter gradients as xla, to fp32 tolerance."""
    from flax import nnx

    from mufun_jax.config import RunSettings, preset
    from mufun_jax.models import MuFun
    from mufun_jax.splice import SpliceSample, collate

    cfg = preset("mufun-tiny")
    rng = np.random.default_rng(0)
    samples = [SpliceSample([*rng.integers(1, 500, 3), -200, *rng.integers(1, 500, 4 + i)], [1]) for i in range(2)]
    batch = collate(samples, num_chunks=2, tokens_per_chunk=cfg.tokens_per_chunk, max_length=4096, pad_token_id=0,
                    pad_to=640)
    batch["segment_ids"][0, 300:] = np.where(batch["segment_ids"][0, 300:] > 0, 2, 0)  # two samples in row 0
    mel = jnp.asarray(rng.uniform(-1, 1, (2, 128, 3000)).astype(np.float32))
    real = jnp.asarray(batch["segment_ids"] != 0)[..., None]

    def run(impl):
        model = MuFun(cfg, RunSettings(attention_impl=impl), rngs=nnx.Rngs(0))
        gd, st = nnx.split(model)

        def loss(st):
            logits, _ = nnx.merge(gd, st)(batch["input_ids"], mel, batch["audio_slots"], positions=batch["positions"],
                                          segment_ids=batch["segment_ids"])
            return jnp.sum(jnp.where(real, jax.nn.log_softmax(logits), 0.0)[..., 7]), logits

        (_, logits), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(st)
        return np.asarray(logits)[np.asarray(batch["segment_ids"]) != 0], g

    a, ga = run("blocked")
    b, gb = run("xla")
    assert rel_err(a, b) < 1e-5
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        assert rel_err(x, y) < 1e-4
