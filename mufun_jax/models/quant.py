"""Weight-only quantisation of the linear layers and the embedding: int8 and NF4.

A quantised :class:`~mufun_jax.models.layers.Linear` keeps its ``kernel`` name, with codes in place
of the float weights, plus a ``kernel_scale``; compute stays in the run's dtype. This module is the
arithmetic on arrays and parameter trees; :func:`mufun_jax.models.layers.quantize_module` applies it
to built layers, so the layers import it and not the other way round. Why these two:

- ``int8``: symmetric, one scale per output channel (absmax / 127). The scale is applied after the
  matmul, ``(x @ q) * s``, so the kernel is only ever cast, never rescaled, and the bytes per
  weight halve against bf16. The token embedding is quantised the same way, one scale per row.
- ``nf4``: QLoRA's 4-bit NormalFloat (Dettmers et al. 2023): each block of 64 input rows of a
  column is scaled by its absmax and rounded to the nearest of 16 normal quantiles; two codes are
  packed in one byte. It is dequantised to the compute dtype right before its matmul. The
  embedding stays int8 under ``nf4`` (a row gather has no block to share a scale with).

Codes are :class:`QuantizedWeight` variables, not ``nnx.Param``: they never train and never get
optimizer state. Only the frozen base is quantised; LoRA adapters stay in float (QLoRA).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mufun_jax.run_settings import QUANT_MODES

NF4_BLOCK = 64  # input rows that share one NF4 scale

# The 16 NF4 levels of bitsandbytes / QLoRA (quantiles of N(0, 1), rescaled to [-1, 1], exact 0).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)


class QuantizedWeight(nnx.Variable):
    """Integer codes of a frozen weight (int8, or two NF4 codes per uint8)."""


class QuantScale(nnx.Variable):
    """The float scales that go with a :class:`QuantizedWeight`."""


def check_mode(mode) -> None:
    if mode is not None and mode not in QUANT_MODES:
        raise ValueError(f"quantize={mode!r} is not one of {list(QUANT_MODES)} (or none)")


# -- the arithmetic (pure functions on arrays; leading axes such as 'layers' pass through) -----


def int8_quantize(w, axis: int = -2):
    """Symmetric int8 with one scale per slice along ``axis`` (the input axis of a kernel)."""
    w32 = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(w32), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)
    q = jnp.clip(jnp.round(w32 / scale), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axis).astype(w.dtype)


def nf4_quantize(w):
    """(..., in, out) -> packed codes (..., in/2, out) uint8 and block scales (..., in/64, out)
    (blocks of gcd(in, 64) rows when 64 does not divide ``in``)."""
    *lead, n_in, n_out = w.shape
    block = math.gcd(n_in, NF4_BLOCK)  # 64, or less for the odd small test model
    if block % 2:
        raise ValueError(f"nf4 packs two input rows per byte, so the input size must be even; got a kernel of "
                         f"shape {tuple(w.shape)}: use quantize=int8 for this model")
    blocks = w.astype(jnp.float32).reshape(*lead, n_in // block, block, n_out)
    amax = jnp.max(jnp.abs(blocks), axis=-2, keepdims=True)
    amax = jnp.where(amax > 0, amax, 1.0)
    mid = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)
    codes = jnp.searchsorted(mid, (blocks / amax).ravel()).reshape(*lead, n_in, n_out).astype(jnp.uint8)
    packed = codes[..., 0::2, :] | (codes[..., 1::2, :] << 4)
    return packed, jnp.squeeze(amax, -2).astype(w.dtype)


def nf4_dequantize(packed, scale, dtype):
    *lead, half, n_out = packed.shape
    codes = jnp.stack([packed & 15, packed >> 4], axis=-2).reshape(*lead, 2 * half, n_out)
    w = jnp.asarray(NF4_LEVELS, dtype)[codes.astype(jnp.int32)]
    n_blocks = scale.shape[-2]
    return (w.reshape(*lead, n_blocks, 2 * half // n_blocks, n_out) * scale.astype(dtype)[..., None, :]).reshape(
        *lead, 2 * half, n_out)


def dequantize_kernel(codes, scale, dtype=jnp.float32):
    """The float kernel back from its codes (for merging adapters and for tests)."""
    if codes.dtype == jnp.int8:
        return codes.astype(dtype) * scale.astype(dtype)[..., None, :]
    return nf4_dequantize(codes, scale, dtype)


def linear(x, codes, scale, dtype):
    """``x @ W`` for a quantised kernel, in ``dtype``."""
    if codes.dtype == jnp.int8:
        return jnp.dot(x.astype(dtype), codes.astype(dtype)) * scale.astype(dtype)
    return jnp.dot(x.astype(dtype), nf4_dequantize(codes, scale, dtype))


# -- parameter trees ------------------------------------------------------------------------------


def quantize_params(params: dict, template: dict) -> dict:
    """A float parameter tree (a model directory's) quantised to the structure of ``template``
    (the pure-dict state of a model built with quantisation): each kernel or embedding whose
    template has a scale beside it becomes codes + scale. Leaves are converted one at a time."""
    out = {}
    for k, v in template.items():
        if isinstance(v, dict):
            out[k] = quantize_params(params[k], v)
        elif k in ("kernel_scale", "embedding_scale"):
            continue
        elif k == "kernel" and "kernel_scale" in template:
            q, s = (int8_quantize if v.dtype == jnp.int8 else nf4_quantize)(params[k])
            out[k], out["kernel_scale"] = q, s
        elif k == "embedding" and "embedding_scale" in template:
            out[k], out["embedding_scale"] = int8_quantize(params[k], axis=-1)
        else:
            out[k] = params[k]
    return out


def param_bytes(tree) -> int:
    """Bytes held by the arrays of a parameter tree or module state."""
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))
