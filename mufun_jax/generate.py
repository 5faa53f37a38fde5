"""Generation and scoring on the device: sampling, prefill, decode and teacher-forced scoring.

These are pure functions of a :class:`~mufun_jax.models.MuFun` (merged from its state inside
``jax.jit``) built only from the model's public methods. The host-side engine that schedules
requests onto them is :class:`mufun_jax.engine.Generator`; the AOT compiles use them directly.

KV-cache conventions (those of ``models/qwen3.py``): a row's key/value for position ``p`` lives at
cache slot ``p``, and a query at position ``p`` sees slots ``<= p``. A prompt is written at
positions ``0..T-1``; slots past a row's length hold junk that is masked until overwritten, so a
row can be refilled in place without clearing it.

Continuous batching splits a prompt in two: the **prefix**, everything up to and including its
last ``<audio>`` (system prompt, ``USER:``, the audio tokens), and the **suffix**, the rest (the
question and ``ASSISTANT:``). :func:`prefix_kv` computes a prefix's keys and values once;
:func:`prefill_slots` places prefixes into decode slots of the big cache and prefills the
suffixes on top; :func:`decode_chunk` then advances every slot a few tokens at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mufun_jax.models.qwen3 import KVCache
from mufun_jax.sampling import SamplingParams, choose_tokens, filter_logits, is_stop, row_keys, stop_array  # noqa: F401 - re-exported


@dataclasses.dataclass
class Request:
    """One prompt. ``input_ids`` hold one ``-200`` per audio; ``audios[i]`` goes with the i-th
    placeholder and is either 16 kHz waveform chunks (an array ``(chunks, 480000)``, a list of 1-D
    chunks, or one 1-D waveform that is cut with :func:`audio.chunk`) or log-mel ``(chunks, n_mels, 3000)``.
    ``audio_keys`` (optional, one hashable per audio, e.g. ``(path, segment)``) name the audios for
    the engine's caches; without them an audio is known by a hash of its samples. ``seed`` drives
    this request's sampling; ``max_new_tokens`` (optional) lowers the generator's cap. ``sampling``
    (optional) is this request's own :class:`SamplingParams`; it replaces the run's, its seed and
    ``max_tokens`` included, so requests with different settings share one batch."""

    input_ids: Sequence[int]
    audios: Sequence[Any] = ()
    seed: int = 0
    max_new_tokens: int | None = None
    audio_keys: Sequence[Any] | None = None
    sampling: SamplingParams | None = None


@dataclasses.dataclass
class GenerationOutput:
    token_ids: np.ndarray  # (n,) int32, the stop token included when finish_reason == "stop"
    logprobs: np.ndarray  # (n,) float32, log p(token) under the untempered, unfiltered model distribution
    finish_reason: str  # "stop" | "length"


@dataclasses.dataclass
class ScoreOutput:
    total: float  # sum of token_logprobs: log p(continuation | prompt)
    token_logprobs: np.ndarray  # (n,) float32

    @property
    def mean(self) -> float:
        return self.total / max(len(self.token_logprobs), 1)


# -- prefill and decode ---------------------------------------------------------------------------


def embed_prompt(model, input_ids, audio_slots=None, audio=None, audio_embeds=None):
    """Prompt embeddings with the audio spliced in: ``audio`` (waveform chunks or log-mel) is
    encoded here, or ``audio_embeds`` were encoded before (the engine's audio cache)."""
    if audio is not None:
        audio_embeds = model.encode_audio(audio)
    return model.embed_inputs(input_ids, audio_embeds, audio_slots)


def prefill(model, embeds, lengths, cache: KVCache, chunk: int | None = None, start=None):
    """Write right-padded embeddings (row ``b`` at positions ``start[b] + 0..T-1``, default 0) into
    the cache; returns each row's hidden state at its ``lengths - 1``-th new token, and the cache.

    With ``chunk``, the embeddings go through in pieces of ``chunk`` tokens (a ``lax.scan``): each
    piece attends to the slots already written, so the (T x cache) attention scores shrink to
    (chunk x cache), which is what bounds the batch size for long prompts on the real model."""
    b, t, _ = embeds.shape
    rows = jnp.arange(b)
    start = jnp.zeros((b,), jnp.int32) if start is None else start
    if chunk is None or chunk >= t:
        positions = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :]
        h, cache = model.hidden_states(embeds, positions, cache=cache)
        return h[rows, lengths - 1], cache
    n = t // chunk
    pieces = jnp.swapaxes(embeds.reshape(b, n, chunk, -1), 0, 1)  # (n, B, chunk, H)

    def step(carry, inp):
        cache, last = carry
        j, x = inp
        positions = start[:, None] + j * chunk + jnp.arange(chunk, dtype=jnp.int32)[None, :]
        h, cache = model.hidden_states(x, positions, cache=cache)
        at = lengths - 1 - j * chunk
        here = (at >= 0) & (at < chunk)
        last = jnp.where(here[:, None], h[rows, jnp.clip(at, 0, chunk - 1)].astype(last.dtype), last)
        return (cache, last), None

    init = (cache, jnp.zeros((b, embeds.shape[-1]), model.dtype))
    (cache, last), _ = jax.lax.scan(step, init, (jnp.arange(n, dtype=jnp.int32), pieces))
    return last, cache


def decode_step(model, tokens, positions, cache: KVCache, span: int | None = None):
    """One token per row (``tokens`` (B,) at ``positions`` (B,)) through the cache: fp32 logits
    (B, vocab) and the updated cache. ``span``: attend to the first ``span`` slots only (static;
    above every live row's position), so a step reads the filled part of a long cache."""
    h, cache = model.hidden_states(model.embed_inputs(tokens[:, None]), positions[:, None], cache=cache, span=span)
    return model.logits(h[:, 0]), cache


def prefix_kv(model, input_ids, audio_slots, audio_embeds, chunk: int | None = None) -> KVCache:
    """Keys and values of right-padded prefixes (B, T) at positions ``0..T-1``: a (layers, B, kv_heads,
    T, head_dim) cache that :func:`prefill_slots` puts under the suffixes."""
    b, t = input_ids.shape
    embeds = embed_prompt(model, input_ids, audio_slots, audio_embeds=audio_embeds)
    _, cache = prefill(model, embeds, jnp.ones((b,), jnp.int32), model.init_cache(b, t), chunk)
    return cache


def prefill_slots(model, cache: KVCache, slots, prefix: KVCache, prefix_len, suffix_ids, suffix_len,
                  sampling: SamplingParams, chunk: int | None = None):
    """Put each row's prefix keys/values (``prefix``: (layers, B, kv_heads, P, head_dim),
    ``prefix_len`` real positions of them) into decode slot ``slots[b]`` of ``cache``, prefill the
    suffix tokens (``suffix_ids`` (B, S), ``suffix_len`` real ones) after it, and choose each row's
    first new token. Rows whose slot is out of range (``>= cache`` rows) are padding: nothing of
    them is written. ``sampling`` holds each row's settings (:meth:`SamplingParams.rows`); ``chunk`` runs the suffix prefill in
    pieces when it divides the suffix length. Returns (first tokens, their log-probs, the cache)."""
    s = suffix_ids.shape[1]
    tmp = KVCache(*(jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, s), (0, 0))) for x in prefix))
    chunk = chunk if chunk and s > chunk and s % chunk == 0 else None
    last, tmp = prefill(model, model.embed_inputs(suffix_ids), suffix_len, tmp, chunk, start=prefix_len)
    tok, lp = choose_tokens(model.logits(last), row_keys(sampling), 0, sampling)
    # only the leading positions of the rows change; past the cache's end there is nothing real
    n = min(tmp.max_len, cache.max_len)
    put = lambda big, new: big.at[:, slots, :, :n].set(new[:, :, :, :n].astype(big.dtype), mode="drop")
    return tok, lp, KVCache(put(cache.k, tmp.k), put(cache.v, tmp.v))


def decode_chunk(model, cache: KVCache, tokens, positions, live, remaining, steps, sampling: SamplingParams,
                 max_steps: int, span: int | None = None):
    """Advance every live slot by up to ``max_steps`` tokens in a device loop that stops early as
    soon as some slot finishes (so the host can refill it). ``tokens`` are each slot's last token,
    written at ``positions``; ``remaining`` counts the tokens a slot may still generate; ``steps``
    is each slot's sampling step and ``sampling`` holds its settings, stop ids included; ``span`` is :func:`decode_step`'s,
    and must exceed every live slot's position by ``max_steps``. Returns (cache, tokens, positions,
    live, remaining, steps, new tokens (slots, max_steps), their log-probs, stopped (slots,), steps
    run). A slot's new tokens are the first ``positions_after - positions_before`` of its row."""
    s = tokens.shape[0]
    keys = row_keys(sampling)
    out_tok = jnp.zeros((s, max_steps), jnp.int32)
    out_lp = jnp.zeros((s, max_steps), jnp.float32)
    stopped = jnp.zeros((s,), bool)

    def cond(c):
        i, live, fresh = c[0], c[3], c[-1]
        return (i < max_steps) & jnp.any(live) & ~jnp.any(fresh)

    def body(c):
        i, cache, tokens, live, positions, remaining, steps, out_tok, out_lp, stopped, _ = c
        logits, cache = decode_step(model, tokens, positions, cache, span)
        tok, lp = choose_tokens(logits, keys, steps, sampling)
        out_tok = jax.lax.dynamic_update_index_in_dim(out_tok, jnp.where(live, tok, 0), i, axis=1)
        out_lp = jax.lax.dynamic_update_index_in_dim(out_lp, jnp.where(live, lp, 0.0), i, axis=1)
        remaining = remaining - live
        stop = live & is_stop(tok, sampling)
        stopped = stopped | stop
        fresh = live & (stop | (remaining <= 0))  # finished in this step
        tokens = jnp.where(live, tok, tokens)
        positions = positions + live
        steps = steps + live
        return i + 1, cache, tokens, live & ~fresh, positions, remaining, steps, out_tok, out_lp, stopped, fresh

    init = (jnp.int32(0), cache, tokens, live, positions, remaining, steps, out_tok, out_lp, stopped,
            jnp.zeros((s,), bool))
    n, cache, tokens, live, positions, remaining, steps, out_tok, out_lp, stopped, _ = jax.lax.while_loop(
        cond, body, init)
    return cache, tokens, positions, live, remaining, steps, out_tok, out_lp, stopped, n


def score_positions(model, input_ids, audio_slots, audio, segment_ids, gather_pos, targets, valid):
    """Teacher-forced log p(target) at the gathered positions; one forward pass, no cache."""
    b, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = model.hidden_states(embed_prompt(model, input_ids, audio_slots, audio), positions, segment_ids)
    hs = jnp.take_along_axis(h, gather_pos[..., None], axis=1)  # (B, K, H)
    lp = jax.nn.log_softmax(model.logits(hs), axis=-1)
    lp = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lp, 0.0)


def bucket(n: int, buckets: Sequence[int]) -> int:
    """The smallest of ``buckets`` (increasing) that holds ``n``: static shapes, padded on the host."""
    for b in buckets:
        if n <= b:
            return b
    raise AssertionError(n)  # callers check the limit first


def pow2_upto(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... below ``limit``, then ``limit``: the batch sizes a run compiles."""
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)
