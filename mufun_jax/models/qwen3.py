"""Qwen3 decoder-only LM (HF ``Qwen3ForCausalLM``), with stacked layers and a KV cache.

Per-head q_norm/k_norm before split-half RoPE, grouped-query attention, SiLU-gated MLP,
no biases, tied or untied lm_head. Softmax runs in fp32 whatever the compute dtype.

Two attention modes:
- no cache (training, scoring): causal by array index, restricted to equal ``segment_ids``
  (0 marks padding), so packed rows never attend across samples;
- with a :class:`KVCache` (prefill and decoding): keys/values are written at slot = position,
  and a query at position p sees slots <= p. Rows must be right-padded with positions
  ``0..T-1`` at prefill; slots past a row's length hold junk that is masked until overwritten.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mufun_jax.config import Qwen3Config
from mufun_jax.models import attention as attention_lib
from mufun_jax.models.layers import Embed, Linear, RMSNorm, gather_fsdp, shard_activation
from mufun_jax.models.scan import scan_layers, stack_layers



class KVCache(NamedTuple):
    # (layers, batch, kv_heads, max_len, head_dim): heads-first, so attention reads each head's keys
    # where they lie; a (.., len, kv_heads, ..) layout is transposed for every decode step's matmuls.
    k: jax.Array
    v: jax.Array

    @classmethod
    def init(cls, cfg: Qwen3Config, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


def rope_cos_sin(positions, head_dim: int, theta: float, dtype):
    """HF default RoPE tables for (batch, seq) positions: (batch, seq, head_dim), split-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x, cos, sin):
    """x (b, t, heads, d); rotate_half pairs dimension i with i + d/2."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def cache_mask(positions, cache_len: int):
    """Boolean (batch, q_len, cache_len) mask of the KV-cache mode: a query at position p sees
    slots <= p. (Without a cache the attention backend builds its mask from ``segment_ids``.)"""
    return jnp.arange(cache_len)[None, None, :] <= positions[:, :, None]


class Qwen3Attention(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=False)
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(h, cfg.num_attention_heads * d, axes=("embed", "heads"), **kw)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, axes=("embed", "kv_heads"), **kw)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, axes=("heads", "embed"), **kw)
        nkw = dict(eps=cfg.rms_norm_eps, axes=("head_dim",), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_norm = RMSNorm(d, **nkw)
        self.k_norm = RMSNorm(d, **nkw)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d

    def __call__(self, x, cos, sin, mask, positions, kv=None, segment_ids=None, impl: str = "xla"):
        b, t, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim))
        k = self.k_norm(self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = checkpoint_name(shard_activation(q, ("batch", None, "heads", None)), "query_proj")
        k = checkpoint_name(shard_activation(k, ("batch", None, "kv_heads", None)), "key_proj")
        v = checkpoint_name(shard_activation(v, ("batch", None, "kv_heads", None)), "value_proj")
        if kv is None:  # training / scoring: no cache, the mask comes from segment_ids
            implementation, interpret = attention_lib.resolve(impl, q.dtype)
            out = attention_lib.dot_product_attention(q, k, v, segment_ids=segment_ids, causal=True,
                                                      implementation=implementation, interpret=interpret)
            return checkpoint_name(self.o_proj(out.reshape(b, t, -1)), "out_proj"), kv
        # kv: every layer's cache (layers, b, kv_heads, len, d) and this layer's index. The new
        # entries are scattered into the whole stack, which the layer scan carries: updated in place,
        # where a per-layer slice returned as a scan output would copy the cache at every step.
        k_all, v_all, i = kv
        rows = jnp.arange(b)[:, None]
        k_all = k_all.at[i, rows, :, positions].set(k.astype(k_all.dtype))  # index dims first: (b, t, kvh, d)
        v_all = v_all.at[i, rows, :, positions].set(v.astype(v_all.dtype))
        span = mask.shape[-1]  # the leading slots attended to: all of them, or a bound on the positions
        k, v = (jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)[:, :, :span].astype(q.dtype)
                for a in (k_all, v_all))
        out = attention_lib.masked_attention(q, k, v, mask).reshape(b, t, self.num_heads * self.head_dim)
        return checkpoint_name(self.o_proj(out), "out_proj"), (k_all, v_all)


FUSED_GATE_UP_MIN_ROWS = 512  # tokens per call from which Qwen3MLP fuses gate and up on CPU


class Qwen3MLP(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, use_bias=False)
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x):
        if self._fuse_gate_up(x):
            # One (hidden, 2 x intermediate) matmul. On XLA:CPU the separate pair's backward
            # materialised each SwiGLU gradient transposed, in a strided loop (~36 ms per layer
            # at 1536 x 1536 on a 2-core Xeon); the joint gradient needs no transpose: Qwen3 layers
            # forward + backward 1.39 -> 1.20 s (bench/compare.py --profile shapes), forward equal.
            n = self.gate_proj.kernel.shape[1]
            dtype = self.gate_proj.dtype
            w = jnp.concatenate([self.gate_proj.kernel[...], self.up_proj.kernel[...]], 1).astype(dtype)
            gu = jnp.dot(x.astype(dtype), w)
            g, u = gu[..., :n], gu[..., n:]
        else:
            g, u = self.gate_proj(x), self.up_proj(x)
        h = shard_activation(jax.nn.silu(g) * u, ("batch", None, "mlp"))
        return self.down_proj(h)

    def _fuse_gate_up(self, x) -> bool:
        """CPU only (a concatenation along a tensor-sharded axis would reshuffle shards on a pod),
        plain kernels only (quantised and adapted ones go through ``Linear``), and only for many
        rows: at decode sizes, copying both weights each step would double their memory traffic."""
        plain = all(p.kernel_scale is None and p.lora_a is None and p.bias is None
                    for p in (self.gate_proj, self.up_proj))
        return plain and x.size // x.shape[-1] >= FUSED_GATE_UP_MIN_ROWS and attention_lib.target_platform() == "cpu"


class Qwen3DecoderLayer(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Qwen3Attention(cfg, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = Qwen3MLP(cfg, **kw)

    def __call__(self, x, cos, sin, mask, positions, kv=None, segment_ids=None, impl: str = "xla"):
        h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, positions, kv, segment_ids, impl)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return shard_activation(x, ("batch", None, None)), kv


class Qwen3ForCausalLM(nnx.Module):
    def __init__(self, cfg: Qwen3Config, *, dtype=jnp.float32, param_dtype=jnp.float32, remat_policy: str = "none",
                 attention_impl: str = "auto", rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.remat_policy = remat_policy
        self.attention_impl = attention_impl  # the no-cache path only; the KV-cache path is always xla
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stack_layers(lambda r: Qwen3DecoderLayer(cfg, rngs=r, **kw), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs, **kw)

    def embed(self, input_ids):
        """Token embeddings; negative ids (placeholders, ignore labels) embed as id 0."""
        return self.embed_tokens(jnp.clip(input_ids, 0, self.cfg.vocab_size - 1))

    def logits(self, hidden):
        out = self.embed_tokens.attend(hidden) if self.lm_head is None else self.lm_head(hidden)
        return out.astype(jnp.float32)

    def head_matrix(self):
        """The LM head as one plain (hidden, vocab) matrix in the compute dtype, gathered over
        ``fsdp`` under a mesh, for the training loss (:func:`mufun_jax.loss.fused_nll_sums`). Cast
        and gathered here, once per step: inside the loss's chunk scan XLA gathered it again for
        every chunk. None for a quantised or adapted head, which goes through :meth:`logits`."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        if any(getattr(head, a, None) is not None for a in ("kernel_scale", "embedding_scale", "lora_a")):
            return None
        w = head.embedding if self.lm_head is None else head.kernel
        out = gather_fsdp(w[...].astype(self.dtype), w.get_metadata("logical_axes"))
        return out.T if self.lm_head is None else out

    def hidden_states(self, inputs_embeds, positions=None, segment_ids=None, cache: KVCache | None = None,
                      span: int | None = None):
        """Final-normed hidden states (batch, seq, hidden) and the updated cache (or None).

        ``span`` (static, with a cache): attend to the cache's first ``span`` slots only. Every
        position must be below it; a decode step then reads only the filled part of a long cache,
        whose cost grows with the slots read, not with the work done."""
        b, t, _ = inputs_embeds.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, self.dtype)
        impl = self.attention_impl if cache is None else "xla"
        # without a cache the attention backend builds its mask from segment_ids (block by block)
        if cache is not None:
            span = cache.max_len if span is None else min(span, cache.max_len)
        mask = None if cache is None else cache_mask(positions, span)

        x = shard_activation(inputs_embeds.astype(self.dtype), ("batch", None, None))
        if cache is None:
            body = lambda layer, x, _: layer(x, cos, sin, None, positions, None, segment_ids, impl)
            x, _ = scan_layers(self.layers, body, x, remat_policy=self.remat_policy)
            return self.norm(x), None

        def cached(layer, c, _):
            x, k_all, v_all, i = c
            x, (k_all, v_all) = layer(x, cos, sin, mask, positions, (k_all, v_all, i), segment_ids, impl)
            return (x, k_all, v_all, i + 1), None

        (x, k, v, _), _ = scan_layers(self.layers, cached, (x, cache.k, cache.v, jnp.int32(0)),
                                      remat_policy=self.remat_policy)
        return self.norm(x), KVCache(k, v)

    def __call__(self, input_ids=None, *, inputs_embeds=None, positions=None, segment_ids=None,
                 cache: KVCache | None = None):
        """Returns (fp32 logits, updated cache or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids)
        h, cache = self.hidden_states(inputs_embeds, positions, segment_ids, cache)
        return self.logits(h), cache
