"""MuFun: Whisper encoder -> concatenated taps -> AvgPool -> connector -> splice -> Qwen3.

The splice has static shapes under jit. On the host (:mod:`mufun_jax.splice`) each
``<audio>`` placeholder is pre-expanded to ``tokens_per_chunk x chunks`` slots, and
``audio_slots`` maps every slot to a row of the flattened audio embeddings (``-1`` for text).
On the device the splice is then one gather and one select.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mufun_jax.config import MuFunConfig
from mufun_jax.models.connector import Connector
from mufun_jax.models.layers import shard_activation
from mufun_jax.models.qwen3 import KVCache, Qwen3ForCausalLM
from mufun_jax.models.whisper import WhisperEncoder


class MuFun(nnx.Module):
    def __init__(self, cfg: MuFunConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        kw.update(remat_policy=cfg.remat_policy, attention_impl=cfg.attention_impl)
        self.encoder = WhisperEncoder(cfg.whisper, taps=cfg.taps, rngs=rngs, **kw)
        self.connector = Connector(cfg.connector, rngs=rngs, dtype=kw["dtype"], param_dtype=kw["param_dtype"])
        self.language_model = Qwen3ForCausalLM(cfg.qwen3, rngs=rngs, **kw)

    def audio_features(self, mel):
        """mel (chunks, n_mels, 3000) -> pooled taps (chunks, 300, d_model x taps), before the connector."""
        taps = self.encoder(mel)
        x = jnp.concatenate(taps, axis=-1)
        n, t, c = x.shape
        s = self.cfg.pool_stride
        pooled = x[:, : (t // s) * s].astype(jnp.float32).reshape(n, t // s, s, c).mean(axis=2)  # AvgPool1d(s, s)
        return pooled.astype(x.dtype)

    def encode_audio(self, mel):
        """mel (chunks, n_mels, 3000) -> audio embeddings (chunks, 300, llm_hidden)."""
        return self.connector(self.audio_features(mel))

    def embed_inputs(self, input_ids, audio_embeds=None, audio_slots=None):
        """Text embeddings with audio embeddings spliced in wherever ``audio_slots >= 0``."""
        x = self.language_model.embed(input_ids)
        if audio_embeds is None:
            return x
        flat = audio_embeds.reshape(-1, audio_embeds.shape[-1]).astype(x.dtype)
        gathered = jnp.take(flat, jnp.clip(audio_slots, 0, flat.shape[0] - 1), axis=0)
        return shard_activation(jnp.where((audio_slots >= 0)[..., None], gathered, x), ("batch", None, None))

    def __call__(self, input_ids, mel=None, audio_slots=None, *, positions=None, segment_ids=None,
                 cache: KVCache | None = None):
        """Returns (fp32 logits (batch, seq, vocab), updated cache or None)."""
        if (mel is None) != (audio_slots is None):
            raise ValueError("pass mel and audio_slots together (or neither, for text-only input)")
        audio = None if mel is None else self.encode_audio(mel)
        embeds = self.embed_inputs(input_ids, audio, audio_slots)
        return self.language_model(inputs_embeds=embeds, positions=positions, segment_ids=segment_ids, cache=cache)
