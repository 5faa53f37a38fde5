"""Whisper audio encoder (the encoder of HF ``WhisperForConditionalGeneration``) with
hidden-state taps numbered as HF's ``output_hidden_states``.

Tap 0 is the conv+position output, tap k (0 < k < L) the output of block k, and tap L
the last block's output *after* the final LayerNorm (HF appends ``last_hidden_state``).
The blocks up to the deepest tap run as one ``lax.scan`` that collects the tapped states on
the side, so every block keeps the remat policy and compile time does not grow with depth.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax.ad_checkpoint import checkpoint_name

from mufun_jax.config import WhisperConfig
from mufun_jax.models import attention as attention_lib
from mufun_jax.models.layers import FrozenParam, LayerNorm, Linear, gelu, param, shard_activation
from mufun_jax.models.scan import scan_layers, stack_layers


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's positional table at initialisation (overwritten by real weights on load)."""
    inc = math.log(max_timescale) / (channels // 2 - 1)
    inv = np.exp(-inc * np.arange(channels // 2))
    t = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(t), np.cos(t)], axis=1).astype(np.float32)


class WhisperAttention(nnx.Module):
    """Bidirectional multi-head attention; ``k_proj`` has no bias, as in Whisper."""

    def __init__(self, cfg: WhisperConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d = cfg.d_model
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(d, d, axes=("embed", "heads"), use_bias=False, **kw)
        self.v_proj = Linear(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Linear(d, d, axes=("heads", "embed"), **kw)
        self.num_heads = cfg.encoder_attention_heads
        self.head_dim = cfg.head_dim

    def __call__(self, x, impl: str = "auto"):
        b, t, _ = x.shape
        split = lambda y, name: checkpoint_name(
            shard_activation(y.reshape(b, t, self.num_heads, self.head_dim), ("batch", None, "heads", None)), name)
        q, k, v = split(self.q_proj(x), "query_proj"), split(self.k_proj(x), "key_proj"), split(self.v_proj(x),
                                                                                                 "value_proj")
        implementation, interpret = attention_lib.resolve(impl, q.dtype)
        out = attention_lib.dot_product_attention(q, k, v, causal=False, implementation=implementation,
                                                  interpret=interpret)
        return checkpoint_name(self.out_proj(out.reshape(b, t, -1)), "out_proj")


class WhisperEncoderLayer(nnx.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + fc2(gelu(fc1(LN(x))))."""

    def __init__(self, cfg: WhisperConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d = cfg.d_model
        self.self_attn_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = WhisperAttention(cfg, **kw)
        self.final_layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, **kw)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x, impl: str = "auto"):
        x = x + self.self_attn(self.self_attn_layer_norm(x), impl)
        h = shard_activation(gelu(self.fc1(self.final_layer_norm(x))), ("batch", None, "mlp"))
        return shard_activation(x + self.fc2(h), ("batch", None, None))


class WhisperEncoder(nnx.Module):
    def __init__(self, cfg: WhisperConfig, *, taps=None, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat_policy: str = "none", attention_impl: str = "auto", rngs: nnx.Rngs):
        self.cfg = cfg
        self.taps = tuple(taps) if taps is not None else (cfg.encoder_layers,)
        if list(self.taps) != sorted(set(self.taps)) or self.taps[0] < 0 or self.taps[-1] > cfg.encoder_layers:
            raise ValueError(f"taps={list(self.taps)} must be strictly increasing in [0, {cfg.encoder_layers}]")
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_impl = attention_impl
        d, m = cfg.d_model, cfg.num_mel_bins
        init = nnx.initializers.lecun_normal()
        # Conv kernels are stored (width, in, out); torch stores (out, in, width).
        self.conv1 = nnx.Dict(
            kernel=param(rngs, init, (3, m, d), ("conv_window", "mel", "embed"), param_dtype),
            bias=param(rngs, nnx.initializers.zeros, (d,), ("embed",), param_dtype),
        )
        self.conv2 = nnx.Dict(
            kernel=param(rngs, init, (3, d, d), ("conv_window", "conv_in", "embed"), param_dtype),
            bias=param(rngs, nnx.initializers.zeros, (d,), ("embed",), param_dtype),
        )
        self.embed_positions = FrozenParam(
            jnp.asarray(sinusoids(cfg.max_source_positions, d), param_dtype), logical_axes=("positions", "embed")
        )
        self.layers = stack_layers(
            lambda r: WhisperEncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=r), cfg.encoder_layers, rngs
        )
        self.layer_norm = LayerNorm(d, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def check_input(self, mel) -> None:
        cfg = self.cfg
        if mel.ndim != 3 or mel.shape[1] != cfg.num_mel_bins or mel.shape[2] != cfg.num_frames:
            raise ValueError(
                f"Whisper expects mel features of shape (chunks, {cfg.num_mel_bins}, {cfg.num_frames}); got "
                f"{tuple(mel.shape)}. Pad or trim each 30 s chunk to {cfg.num_frames} frames with "
                f"{cfg.num_mel_bins} mel bins (WhisperFeatureExtractor does this)."
            )

    def _conv(self, x, p, stride):
        """Conv1d (width 3, padding 1) as one matmul over the 3 shifted inputs side by side. It
        equals ``lax.conv_general_dilated``, but XLA:CPU computes that conv's kernel gradient as
        a convolution with a 3000-wide window: 20 of the 37 s of a CPU train step
        (bench/compare.py). As a matmul both gradients are matmuls on every backend."""
        kernel = p["kernel"][...].astype(self.dtype)  # (3, in, out)
        width, c_in, c_out = kernel.shape
        n_out = (x.shape[1] + 2 - width) // stride + 1
        xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
        cols = jnp.concatenate([xp[:, i:i + stride * (n_out - 1) + 1:stride] for i in range(width)], axis=-1)
        y = cols @ kernel.reshape(width * c_in, c_out)
        return gelu(y + p["bias"][...].astype(self.dtype))

    def __call__(self, mel) -> list[jax.Array]:
        """mel (chunks, n_mels, 3000) -> one (chunks, 1500, d_model) array per tap."""
        self.check_input(mel)
        x = jnp.swapaxes(mel.astype(self.dtype), 1, 2)  # (N, frames, mels)
        x = self._conv(x, self.conv1, 1)
        x = self._conv(x, self.conv2, 2)
        x = x + self.embed_positions[...].astype(self.dtype)
        x = shard_activation(x, ("batch", None, None))

        n = self.cfg.encoder_layers
        stop = self.taps[-1]  # no layer after the deepest tap runs
        inner = [t for t in self.taps if 0 < t < stop]  # collected on the side; taps 0 and stop are not
        body = lambda layer, h, _: (layer(h, self.attention_impl), None)
        first, by_tap = x, {}
        if inner:
            x, _, collected = scan_layers(self.layers, body, x, stop=stop, remat_policy=self.remat_policy,
                                          collect=inner)
            by_tap = {t: collected[j] for j, t in enumerate(inner)}
        elif stop > 0:
            x, _ = scan_layers(self.layers, body, x, stop=stop, remat_policy=self.remat_policy)
        by_tap[stop] = self.layer_norm(x) if stop == n else x  # HF: the last hidden state is after the norm
        outs = [first if tap == 0 else by_tap[tap] for tap in self.taps]
        return outs
