"""Small building blocks shared by the models: parameters with logical axes, Linear,
LayerNorm, RMSNorm, Embed, and the dtype/GELU conventions of the PyTorch reference; and the two
in-place changes of built layers, LoRA adapters (:func:`apply_lora`) and weight-only quantisation
(:func:`quantize_module`), whose arithmetic lives below in :mod:`.lora` and :mod:`.quant`.

We write these ourselves rather than use ``nnx.Linear`` & co. so that (a) every parameter
carries ``logical_axes`` metadata that :mod:`mufun_jax.sharding` maps onto a mesh, (b)
normalisations follow HF's exact fp32 recipes, and (c) parameter names are stable for the
weight mapping in :mod:`mufun_jax.convert`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mufun_jax.models import lora, quant
from mufun_jax.run_settings import LORA_LINEAR_NAMES, LoraConfig
from mufun_jax.sharding import DEFAULT_RULES, MESH_AXES, logical_to_spec

Axes = tuple[str, ...]

default_kernel_init = nnx.initializers.normal(0.02)


class FrozenParam(nnx.Variable):
    """A weight that is loaded and saved like a parameter but never trained
    (Whisper's positional table: ``requires_grad_(False)`` in HF)."""


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: Axes, dtype) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match parameter shape {tuple(shape)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def active_mesh():
    """The mesh set by ``jax.set_mesh`` / ``jax.sharding.use_abstract_mesh`` while tracing, if it is a
    multi-device (data, fsdp, tensor) mesh; else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not set(MESH_AXES) <= set(mesh.axis_names):
        return None
    return mesh


def gather_fsdp(x, axes: Sequence[str | None]):
    """``x`` (a weight with these logical axes) all-gathered over the ``fsdp`` mesh axis, its other
    splits (``tensor``) kept; ``x`` unchanged without a mesh."""
    drop = lambda v: tuple(a for a in ((v,) if isinstance(v, str) else v or ()) if a != "fsdp") or None
    return shard_activation(x, axes, tuple((k, drop(v)) for k, v in DEFAULT_RULES))


def shard_activation(x, axes: Sequence[str | None], rules=None):
    """``with_sharding_constraint`` from logical axes (``('batch', None, 'mlp')``) when a mesh is
    active, else ``x`` unchanged. Without it XLA may keep the batch of the activations unsharded
    under FSDP (the weights use the fsdp axis for their width). A mesh axis that does not divide
    its dimension is dropped, so odd shapes (a batch of 1 in decoding) stay legal."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = []
    for dim, entry in zip(x.shape, logical_to_spec(axes) if rules is None else logical_to_spec(axes, rules)):
        names = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
        names = tuple(n for n in names if mesh.shape[n] > 1)
        while names and dim % math.prod(mesh.shape[n] for n in names):
            names = names[:-1]
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def gelu(x):
    """Exact (erf) GELU, ``x/2 * (1 + erf(x/sqrt 2))``, written as torch ``nn.GELU()`` computes it.

    Not ``jax.nn.gelu(approximate=False)``: that form uses ``erfc``, which XLA:CPU expands into
    a two-branch rational approximation with an ``exp`` inside; in the encoder's backward fusion it
    ran at 16 ns per element (bench/compare.py --profile). jax's default is the tanh approximation."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class Linear(nnx.Module):
    """``y = x @ kernel + bias`` with kernel stored (in, out) and matmul in ``dtype``.

    The one place where adapters and quantisation enter the model: a quantised kernel has a
    ``kernel_scale`` beside its codes (:mod:`mufun_jax.models.quant`), an adapted one has
    ``lora_a`` / ``lora_b`` (:mod:`mufun_jax.models.lora`); both are added to a built model."""

    def __init__(self, in_features: int, out_features: int, *, axes: Axes, use_bias: bool = True,
                 dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs, kernel_init=default_kernel_init):
        self.kernel = param(rngs, kernel_init, (in_features, out_features), axes, param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (out_features,), axes[-1:], param_dtype) if use_bias else None
        self.dtype = dtype
        self.kernel_scale = nnx.data(None)  # set by quantisation / adapters (data, not static, attributes)
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)
        self.lora_scaling, self.lora_dropout, self.lora_id = 0.0, 0.0, 0

    def __call__(self, x):
        if self.kernel_scale is None:
            # FSDP: gather the weight once, in the compute dtype, where it is used. Left to itself
            # XLA gathered the attention projections a third time in the backward pass, in the
            # layout of their transposed use (3 GB more ICI per step for Qwen3-8B, docs/tpu.md).
            w = gather_fsdp(self.kernel[...].astype(self.dtype), self.kernel.get_metadata("logical_axes"))
            y = jnp.dot(x.astype(self.dtype), w)
        else:
            y = quant.linear(x, self.kernel[...], self.kernel_scale[...], self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            y = y + lora.delta(self, x, self.dtype)
        return y


class LayerNorm(nnx.Module):
    """torch ``nn.LayerNorm`` semantics (eps 1e-5 by default, unlike Flax's 1e-6); statistics in fp32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",), param_dtype)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), ("norm",), param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class RMSNorm(nnx.Module):
    """HF ``Qwen3RMSNorm``: normalise in fp32, cast back to the input dtype, then times the weight."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axes: Axes = ("norm",), dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), axes, param_dtype)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        in_dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32.astype(in_dtype) * self.scale[...].astype(in_dtype)).astype(self.dtype)


class Embed(nnx.Module):
    """Token embedding table (vocab, embed); ``attend`` gives tied-embedding logits."""

    def __init__(self, num_embeddings: int, features: int, *, dtype=jnp.float32, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.embedding = param(rngs, default_kernel_init, (num_embeddings, features), ("vocab", "embed"),
                               param_dtype)
        self.embedding_scale = nnx.data(None)  # one scale per row when quantised to int8
        self.dtype = dtype

    def __call__(self, ids):
        rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        if self.embedding_scale is not None:
            rows = rows * jnp.take(self.embedding_scale[...], ids, axis=0).astype(self.dtype)[..., None]
        return rows

    def attend(self, x):
        out = jnp.dot(x.astype(self.dtype), self.embedding[...].astype(self.dtype).T)
        if self.embedding_scale is not None:
            out = out * self.embedding_scale[...].astype(self.dtype)
        return out


# -- adapters and quantisation of built layers ----------------------------------------------------


def apply_lora(module: nnx.Module, cfg: LoraConfig, name: str, rngs: nnx.Rngs) -> int:
    """Add adapters to the targeted Linear layers of ``module`` (named ``name``: whisper,
    connector or llm) in place; returns how many layers got one."""
    wanted = cfg.names(name)
    found = [(path, node) for path, node in nnx.iter_graph(module)
             if isinstance(node, Linear) and path and path[-1] in wanted]
    if not found:
        raise ValueError(f"lora.targets={list(cfg.targets)} match no linear layer of module {name!r}; its linear "
                         f"layers are {list(LORA_LINEAR_NAMES[name])}")
    for i, (_, lin) in enumerate(found):
        axes = lin.kernel.get_metadata("logical_axes")
        *lead, n_in, n_out = lin.kernel.shape
        bound = 1.0 / math.sqrt(n_in)
        dtype = lin.kernel.dtype if jnp.issubdtype(lin.kernel.dtype, jnp.floating) else jnp.float32
        a = jax.random.uniform(rngs.params(), (*lead, n_in, cfg.rank), dtype, -bound, bound)
        lin.lora_a = lora.LoraParam(a, logical_axes=axes[:-1] + (None,))
        lin.lora_b = lora.LoraParam(jnp.zeros((*lead, cfg.rank, n_out), dtype),
                                    logical_axes=axes[:-2] + (None, axes[-1]))
        lin.lora_scaling, lin.lora_dropout, lin.lora_id = cfg.scaling, cfg.dropout, i
    return len(found)


def _quantize_linear(lin, mode: str) -> None:
    axes = lin.kernel.get_metadata("logical_axes")
    w = lin.kernel[...]
    if mode == "int8":
        codes, scale = quant.int8_quantize(w)
        scale_axes = axes[:-2] + axes[-1:]
    else:
        codes, scale = quant.nf4_quantize(w)
        scale_axes = axes[:-2] + (None, axes[-1])  # the in-blocks stay whole (they rarely divide a mesh)
    lin.kernel = quant.QuantizedWeight(codes, logical_axes=axes)
    lin.kernel_scale = quant.QuantScale(scale, logical_axes=scale_axes)


def _quantize_embed(emb) -> None:
    axes = emb.embedding.get_metadata("logical_axes")
    codes, scale = quant.int8_quantize(emb.embedding[...], axis=-1)
    emb.embedding = quant.QuantizedWeight(codes, logical_axes=axes)
    emb.embedding_scale = quant.QuantScale(scale, logical_axes=axes[:-1])


def quantize_module(module: nnx.Module, mode: str) -> int:
    """Quantise every Linear kernel and embedding table inside ``module`` in place; the count."""
    quant.check_mode(mode)
    n = 0
    for _, node in list(nnx.iter_graph(module)):
        if isinstance(node, Linear) and node.kernel_scale is None:
            _quantize_linear(node, mode)
            n += 1
        elif isinstance(node, Embed) and node.embedding_scale is None:
            _quantize_embed(node)
            n += 1
    return n
