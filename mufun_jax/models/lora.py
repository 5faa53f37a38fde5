"""LoRA adapters on the model's own :class:`~mufun_jax.models.layers.Linear` layers.

``y = x W + (dropout(x) A) B * alpha / rank``, with A (in, rank) initialised as PEFT does (Kaiming
uniform, bound ``1 / sqrt(in)``) and B (rank, out) at zero, so a fresh adapter changes nothing.
Adapters are :class:`LoraParam` (an ``nnx.Param``); on stacked layers they get the leading
``layers`` axis too, so the layer scan carries them like any weight.

Why not qwix: qwix 0.1.8 intercepts the modules it sees while tracing, and our layers are stacked
and run under ``lax.scan``; on a minimal stacked model it failed with an IndexError on the scan
length, a TraceContextError, and adapters dropped from the stacked state. Adapters on our one
Linear class are a few lines and keep the parameter names stable for PEFT's format.

This module is the adapters' arithmetic (their contribution, merging, dropout keys);
:func:`mufun_jax.models.layers.apply_lora` adds them to built layers, so the layers import it and
not the other way round.

Dropout needs a key per call. The training step opens :func:`dropout_key` around the loss;
:func:`mufun_jax.models.scan.scan_layers` gives every scanned layer its own key, and each Linear
folds in its own id, so no two layers or projections share a mask.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from mufun_jax.models.quant import dequantize_kernel


class LoraParam(nnx.Param):
    """A LoRA factor: trained when its module is set to ``lora``, merged into the kernel on export."""


# -- dropout keys ------------------------------------------------------------------------------

_KEY: contextvars.ContextVar = contextvars.ContextVar("lora_dropout_key", default=None)


@contextlib.contextmanager
def dropout_key(key):
    """LoRA dropout is active (with this key) inside the block; outside it adapters run as in eval."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


def current_key():
    return _KEY.get()


def delta(lin, x, dtype):
    """The adapter's contribution ``dropout(x) A B * scaling`` of one Linear."""
    h = x.astype(dtype)
    key = current_key()
    if key is not None and lin.lora_dropout > 0:
        keep = jax.random.bernoulli(jax.random.fold_in(key, lin.lora_id), 1.0 - lin.lora_dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - lin.lora_dropout), 0).astype(dtype)
    return jnp.dot(jnp.dot(h, lin.lora_a[...].astype(dtype)), lin.lora_b[...].astype(dtype)) * lin.lora_scaling


def merge_params(params: dict, scaling: float) -> dict:
    """A parameter tree with its adapters merged: ``kernel + A @ B * scaling`` (quantised kernels
    are dequantised first), LoRA factors and scales removed. The result has the plain layout."""
    out = {}
    for k, v in params.items():
        if k in ("lora_a", "lora_b", "kernel_scale"):
            continue
        if isinstance(v, dict):
            out[k] = merge_params(v, scaling)
        elif k == "kernel" and ("lora_a" in params or "kernel_scale" in params):
            w = dequantize_kernel(v, params["kernel_scale"]) if "kernel_scale" in params else v.astype(jnp.float32)
            if "lora_a" in params:
                w = w + jnp.matmul(params["lora_a"].astype(jnp.float32), params["lora_b"].astype(jnp.float32)) * scaling
            out[k] = w
        elif k == "embedding" and "embedding_scale" in params:
            out[k] = v.astype(jnp.float32) * params["embedding_scale"].astype(jnp.float32)[..., None]
        elif k == "embedding_scale":
            continue
        else:
            out[k] = v
    return out


def adapter_params(params: dict) -> dict:
    """Only the LoRA factors of a parameter tree (nested, other leaves dropped)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, dict):
            sub = adapter_params(v)
            if sub:
                out[k] = sub
        elif k in ("lora_a", "lora_b"):
            out[k] = v
    return out
