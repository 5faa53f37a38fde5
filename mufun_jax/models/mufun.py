"""MuFun: Whisper encoder -> concatenated taps -> AvgPool -> connector -> splice -> Qwen3.

The model owns its forward pass. Every caller (the training loss, the generator, scoring, the
AOT compiles) composes these public methods and nothing else:

    audio_embeds = model.encode_audio(waves_or_mel)            # (chunks, tokens_per_chunk, hidden)
    embeds = model.embed_inputs(input_ids, audio_embeds, audio_slots)
    hidden, cache = model.hidden_states(embeds, positions, segment_ids, cache=None)
    logits = model.logits(hidden)                              # fp32

The splice has static shapes under jit. On the host (:mod:`mufun_jax.splice`) each ``<audio>``
placeholder is pre-expanded to ``tokens_per_chunk x chunks`` slots, and ``audio_slots`` maps every
slot to a row of the flattened audio embeddings (``-1`` for text). On the device the splice is then
one gather and one select.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mufun_jax import audio as audio_lib
from mufun_jax.config import MuFunConfig
from mufun_jax.models.connector import Connector
from mufun_jax.models.layers import apply_lora, quantize_module, shard_activation
from mufun_jax.models.qwen3 import KVCache, Qwen3ForCausalLM
from mufun_jax.models.whisper import WhisperEncoder
from mufun_jax.run_settings import RunSettings


class MuFun(nnx.Module):
    def __init__(self, cfg: MuFunConfig, run: RunSettings | None = None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.run = run = run or RunSettings()
        kw = dict(dtype=jnp.dtype(run.dtype), param_dtype=jnp.dtype(run.param_dtype))
        deep = dict(remat_policy=run.remat_policy, attention_impl=run.attention_impl)
        self.encoder = WhisperEncoder(cfg.whisper, taps=cfg.taps, rngs=rngs, **kw, **deep)
        self.connector = Connector(cfg.connector, rngs=rngs, **kw)
        self.language_model = Qwen3ForCausalLM(cfg.qwen3, rngs=rngs, **kw, **deep)
        parts = {"whisper": self.encoder, "connector": self.connector, "llm": self.language_model}
        for name in run.lora_modules:
            apply_lora(parts[name], run.lora, name, rngs)
        if run.quantize:
            for name in run.quantize_modules:
                quantize_module(parts[name], run.quantize)

    @property
    def dtype(self):
        return self.language_model.dtype

    def audio_features(self, mel):
        """mel (chunks, n_mels, 3000) -> pooled taps (chunks, tokens_per_chunk, d_model x taps)."""
        x = jnp.concatenate(self.encoder(mel), axis=-1)
        n, t, c = x.shape
        s = self.cfg.pool_stride
        pooled = x[:, : (t // s) * s].astype(jnp.float32).reshape(n, t // s, s, c).mean(axis=2)  # AvgPool1d(s, s)
        return pooled.astype(x.dtype)

    def encode_audio(self, audio):
        """16 kHz waveform chunks (chunks, 480000) or log-mel (chunks, n_mels, 3000) -> audio
        embeddings (chunks, tokens_per_chunk, llm_hidden). Waveforms get their log-mel here, on the
        device, so the host only ships samples."""
        if audio.ndim == 2:
            if audio.shape[1] != audio_lib.CHUNK_SAMPLES:
                raise ValueError(f"waveform chunks must be (chunks, {audio_lib.CHUNK_SAMPLES}) 16 kHz samples; got "
                                 f"{tuple(audio.shape)}. Pad each 30 s chunk (audio.pad_chunks), or pass log-mel "
                                 f"(chunks, {self.cfg.whisper.num_mel_bins}, {self.cfg.whisper.num_frames})")
            audio = audio_lib.log_mel_spectrogram(audio, self.cfg.whisper.num_mel_bins)
        return self.connector(self.audio_features(audio))

    def embed_inputs(self, input_ids, audio_embeds=None, audio_slots=None):
        """Text embeddings with audio embeddings spliced in wherever ``audio_slots >= 0``."""
        x = self.language_model.embed(input_ids)
        if audio_embeds is None:
            return x
        flat = audio_embeds.reshape(-1, audio_embeds.shape[-1]).astype(x.dtype)
        gathered = jnp.take(flat, jnp.clip(audio_slots, 0, flat.shape[0] - 1), axis=0)
        return shard_activation(jnp.where((audio_slots >= 0)[..., None], gathered, x), ("batch", None, None))

    def hidden_states(self, inputs_embeds, positions=None, segment_ids=None, cache: KVCache | None = None,
                      span: int | None = None):
        """The decoder: final-normed hidden states (batch, seq, hidden) and the updated cache (or None)."""
        return self.language_model.hidden_states(inputs_embeds, positions, segment_ids, cache, span)

    def logits(self, hidden):
        """fp32 vocabulary logits of hidden states (any leading shape)."""
        return self.language_model.logits(hidden)

    def head_matrix(self):
        """The plain LM head matrix for the training loss, or None (see the language model's)."""
        return self.language_model.head_matrix()

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.init(self.cfg.qwen3, batch, max_len, dtype=self.dtype)

    def __call__(self, input_ids, audio=None, audio_slots=None, *, positions=None, segment_ids=None,
                 cache: KVCache | None = None):
        """The whole pipeline at once: (fp32 logits (batch, seq, vocab), updated cache or None).
        ``audio`` is waveform chunks or log-mel, as :meth:`encode_audio` takes."""
        if (audio is None) != (audio_slots is None):
            raise ValueError("pass audio and audio_slots together (or neither, for text-only input)")
        audio_embeds = None if audio is None else self.encode_audio(audio)
        hidden, cache = self.hidden_states(self.embed_inputs(input_ids, audio_embeds, audio_slots), positions,
                                           segment_ids, cache)
        return self.logits(hidden), cache
