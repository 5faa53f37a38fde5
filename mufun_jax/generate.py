"""Batched, jit-compiled generation and multiple-choice scoring for MuFun.

Why it is shaped this way:
- **Static shapes.** :class:`Generator` pads every batch to ``batch_size`` rows, every prompt to a
  length bucket and the batch's audio chunks to a chunk bucket, so a long run compiles once per
  (length bucket, chunk bucket) and never per batch. Sampling settings, seeds, stop ids and
  per-request token limits are traced arrays, so changing them does not recompile either.
- **Prefill, then a device loop.** Right-padded prompts (positions ``0..T-1`` per row) fill a KV
  cache preallocated to ``bucket + max_new_tokens`` slots; each row's first new token comes from
  the logits at its own last prompt position. A ``lax.while_loop`` then decodes one token per row
  per step at position ``length + i`` and exits as soon as every row is done, so the host is not
  in the loop and short answers do not pay for ``max_new_tokens``.
- **Only the needed logits.** The prefill gathers one hidden state per row before the LM head, and
  scoring gathers the continuation positions only: (rows x tokens x vocab) logits at prompt length
  would not fit for the real 152k vocabulary.
- **Reproducible sampling.** Every row has its own key, ``fold_in(key(seed), step)``, so what a
  request samples depends on its seed and logits only, not on the other rows of its batch.
- **Audio once.** Waveforms go to the device as 16 kHz chunks; the log-mel runs there (a small
  jitted :func:`mufun_jax.audio.log_mel_spectrogram`) and each chunk is encoded once, in the prefill.

The jitted functions take the model's state as an argument (``nnx.split``), so sharded parameters
work as they are; nothing in them touches the host.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mufun_jax import audio as audio_lib
from mufun_jax.config import ENDOFTEXT_ID, IM_END_ID, IMAGE_TOKEN_INDEX, check_sampling
from mufun_jax.models.qwen3 import KVCache
from mufun_jax.splice import expand_placeholders

DEFAULT_EOS_TOKEN_ID = (IM_END_ID, ENDOFTEXT_ID)  # `<|im_end|>` ends an instruct answer, `<|endoftext|>` a base one
_STOP_PAD = 8  # stop-id arrays are padded to a multiple of this, so their count rarely changes the shape


@dataclasses.dataclass
class Request:
    """One prompt. ``input_ids`` hold one ``-200`` per audio; ``audios[i]`` goes with the i-th
    placeholder and is either 16 kHz waveform chunks (an array ``(chunks, 480000)``, a list of 1-D
    chunks, or one 1-D waveform that is cut with :func:`audio.chunk`) or log-mel ``(chunks, n_mels, 3000)``.
    ``seed`` drives this request's sampling; ``max_new_tokens`` (optional) lowers the generator's cap."""

    input_ids: Sequence[int]
    audios: Sequence[Any] = ()
    seed: int = 0
    max_new_tokens: int | None = None


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


# -- device side -------------------------------------------------------------------------------


def filter_logits(logits, top_k, top_p):
    """HF's TopK then TopP warpers with per-row settings: ``top_k <= 0`` and ``top_p >= 1`` disable
    them. Removed entries become -inf. One descending sort serves both."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    desc = jnp.where(jnp.arange(v)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (before < top_p[:, None]) | (top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(keep.sum(-1), 1)  # the most likely token is always kept
    thr = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where(logits < thr, -jnp.inf, logits)


def choose_tokens(logits, keys, step, temperature, top_k, top_p):
    """Next token per row (greedy where ``temperature == 0``) and its log-probability under the
    raw model distribution. The sort that sampling needs runs only if some row samples."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        t = jnp.where(temperature > 0, temperature, 1.0)
        warped = filter_logits(logits / t[:, None], top_k, top_p)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
        drawn = jax.vmap(jax.random.categorical)(step_keys, warped).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    tok = jax.lax.cond(jnp.any(temperature > 0), sample, lambda _: greedy, None)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp


def embed_prompt(model, input_ids, audio_slots=None, audio=None):
    """Prompt embeddings with the audio spliced in; ``audio`` is waveform chunks or log-mel."""
    return model.embed_inputs(input_ids, None if audio is None else model.encode_audio(audio), audio_slots)


def prefill(model, embeds, lengths, cache: KVCache, chunk: int | None = None):
    """Fill the cache with right-padded prompt embeddings (positions ``0..T-1``); returns each
    row's hidden state at ``length - 1`` and the cache.

    With ``chunk``, the prompt goes through in pieces of ``chunk`` tokens (a ``lax.scan``): each
    piece attends to the slots already written, so the (T x cache) attention scores shrink to
    (chunk x cache), which is what bounds the batch size for long prompts on the real model."""
    b, t, _ = embeds.shape
    rows = jnp.arange(b)
    if chunk is None or chunk >= t:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        h, cache = model.hidden_states(embeds, positions, cache=cache)
        return h[rows, lengths - 1], cache
    n = t // chunk
    pieces = jnp.swapaxes(embeds.reshape(b, n, chunk, -1), 0, 1)  # (n, B, chunk, H)

    def step(carry, inp):
        cache, last = carry
        j, x = inp
        positions = jnp.broadcast_to(j * chunk + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        h, cache = model.hidden_states(x, positions, cache=cache)
        at = lengths - 1 - j * chunk
        here = (at >= 0) & (at < chunk)
        last = jnp.where(here[:, None], h[rows, jnp.clip(at, 0, chunk - 1)].astype(last.dtype), last)
        return (cache, last), None

    init = (cache, jnp.zeros((b, embeds.shape[-1]), model.dtype))
    (cache, last), _ = jax.lax.scan(step, init, (jnp.arange(n, dtype=jnp.int32), pieces))
    return last, cache


def decode_step(model, tokens, positions, cache: KVCache):
    """One token per row (``tokens`` (B,) at ``positions`` (B,)) through the cache: fp32 logits
    (B, vocab) and the updated cache."""
    h, cache = model.hidden_states(model.embed_inputs(tokens[:, None]), positions[:, None], cache=cache)
    return model.logits(h[:, 0]), cache


def _generate(model, max_new_tokens: int, prefill_chunk: int | None, input_ids, audio_slots, audio, lengths, row_max,
              seeds, temperature, top_k, top_p, stop_ids):
    """Prefill + ``lax.while_loop`` decode. Returns (tokens (B, N), logprobs (B, N), counts (B,),
    stopped (B,), steps run)."""
    b, t = input_ids.shape
    cache = model.init_cache(b, t + max_new_tokens)
    last, cache = prefill(model, embed_prompt(model, input_ids, audio_slots, audio), lengths, cache, prefill_chunk)
    logits = model.logits(last)  # (B, V): only each row's last prompt position
    keys = jax.vmap(jax.random.key)(seeds)
    is_stop = lambda tok: jnp.any(tok[:, None] == stop_ids[None, :], axis=-1)

    tok, lp = choose_tokens(logits, keys, 0, temperature, top_k, top_p)
    live = row_max > 0
    tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(jnp.where(live, tok, 0))
    logprobs = jnp.zeros((b, max_new_tokens), jnp.float32).at[:, 0].set(jnp.where(live, lp, 0.0))
    counts = live.astype(jnp.int32)
    stopped = live & is_stop(tok)
    done = stopped | (counts >= row_max)

    def cond(c):
        i, _, _, _, _, _, done = c
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(c):
        i, cache, tokens, logprobs, counts, stopped, done = c
        prev = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)  # (B,)
        pos = lengths + i - 1  # < t + max_new_tokens - 1: every write lands in the cache
        logits, cache = decode_step(model, prev, pos, cache)
        tok, lp = choose_tokens(logits, keys, i, temperature, top_k, top_p)
        write = ~done
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, jnp.where(write, tok, 0), i, axis=1)
        logprobs = jax.lax.dynamic_update_index_in_dim(logprobs, jnp.where(write, lp, 0.0), i, axis=1)
        counts = counts + write
        stopped = stopped | (write & is_stop(tok))
        done = done | stopped | (counts >= row_max)
        return i + 1, cache, tokens, logprobs, counts, stopped, done

    steps, _, tokens, logprobs, counts, stopped, _ = jax.lax.while_loop(
        cond, body, (jnp.int32(1), cache, tokens, logprobs, counts, stopped, done))
    return tokens, logprobs, counts, stopped, steps


def _score(model, input_ids, audio_slots, audio, segment_ids, gather_pos, targets, valid):
    """Teacher-forced log p(target) at the gathered positions; one forward pass, no cache."""
    b, t = input_ids.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    h, _ = model.hidden_states(embed_prompt(model, input_ids, audio_slots, audio), positions, segment_ids)
    hs = jnp.take_along_axis(h, gather_pos[..., None], axis=1)  # (B, K, H)
    lp = jax.nn.log_softmax(model.logits(hs), axis=-1)
    lp = jnp.take_along_axis(lp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, lp, 0.0)


# -- host side ---------------------------------------------------------------------------------


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise AssertionError(n)  # callers check the limit first


def _pow2_buckets(limit: int) -> tuple[int, ...]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    return tuple(out) + (limit,)


def _stop_array(eos_token_id) -> np.ndarray:
    ids = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, (int, np.integer))
                                           else list(eos_token_id))
    n = max(_STOP_PAD, math.ceil(len(ids) / _STOP_PAD) * _STOP_PAD)
    return np.asarray(ids + [-1] * (n - len(ids)), np.int32)


class Generator:
    """Batched generation and scoring for a :class:`~mufun_jax.models.MuFun` with static shapes.

    ``max_new_tokens`` sizes the KV cache (``bucket + max_new_tokens``) and caps every request.
    ``buckets`` are the padded prompt lengths (audio slots included); ``max_chunks`` limits one
    request's 30 s chunks (default: as many as fit the largest bucket) and ``max_batch_chunks`` one
    batch's (default ``batch_size x max_chunks``). ``chunk_buckets`` (default powers of two up to
    ``max_batch_chunks``) are the padded chunk counts of a batch. ``eos_token_id`` is the default
    stop set. ``compiles`` counts traces of each jitted function, so tests can check bucketing;
    ``stats`` counts batches, rows and decode steps (tokens per row the loop ran for).
    ``prefill_chunk`` (optional, dividing the buckets) runs the prefill in pieces to bound its memory.

    The model's current state is read at every call, so a generator can be reused while training.
    """

    def __init__(self, model, *, max_new_tokens: int = 256, batch_size: int = 8,
                 buckets: Sequence[int] = (256, 512, 1024, 2048, 4096), max_chunks: int | None = None,
                 max_batch_chunks: int | None = None, chunk_buckets: Sequence[int] | None = None,
                 eos_token_id: int | Sequence[int] | None = DEFAULT_EOS_TOKEN_ID, pad_token_id: int | None = None,
                 prefill_chunk: int | None = None):
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be >= 1")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets={list(buckets)} must be strictly increasing positive lengths")
        self.model = model
        self.cfg = model.cfg
        self.max_new_tokens = int(max_new_tokens)
        self.batch_size = int(batch_size)
        self.buckets = tuple(int(b) for b in buckets)
        tpc = self.cfg.tokens_per_chunk
        self.max_chunks = int(max_chunks) if max_chunks is not None else max(self.buckets[-1] // tpc, 1)
        self.max_batch_chunks = int(max_batch_chunks) if max_batch_chunks is not None else (
            self.batch_size * self.max_chunks)
        if self.max_batch_chunks < self.max_chunks:
            raise ValueError(f"max_batch_chunks={self.max_batch_chunks} < max_chunks={self.max_chunks}")
        self.chunk_buckets = tuple(chunk_buckets) if chunk_buckets is not None else _pow2_buckets(self.max_batch_chunks)
        cb = list(self.chunk_buckets)
        if cb != sorted(set(cb)) or cb[0] < 1 or cb[-1] < self.max_batch_chunks:
            raise ValueError(f"chunk_buckets={list(self.chunk_buckets)} must increase and reach "
                             f"max_batch_chunks={self.max_batch_chunks}")
        if prefill_chunk is not None and (prefill_chunk < 1 or any(b % prefill_chunk for b in self.buckets
                                                                    if b > prefill_chunk)):
            raise ValueError(f"prefill_chunk={prefill_chunk} must divide every bucket longer than it "
                             f"(buckets={list(self.buckets)})")
        self.prefill_chunk = prefill_chunk
        self.eos_token_id = eos_token_id
        self.pad_token_id = self.cfg.pad_token_id if pad_token_id is None else int(pad_token_id)
        self.compiles: collections.Counter = collections.Counter()
        self.stats: collections.Counter = collections.Counter()  # batches, rows, decode_steps (loop length)
        self.graphdef = nnx.graphdef(model)

        def generate_fn(state, *args):
            self.compiles["generate"] += 1  # runs only while tracing
            return _generate(nnx.merge(self.graphdef, state), self.max_new_tokens, self.prefill_chunk, *args)

        def score_fn(state, *args):
            self.compiles["score"] += 1
            return _score(nnx.merge(self.graphdef, state), *args)

        def mel_fn(waves):
            self.compiles["log_mel"] += 1
            return audio_lib.log_mel_spectrogram(waves, self.cfg.whisper.num_mel_bins)

        self._generate_fn = jax.jit(generate_fn)
        self._score_fn = jax.jit(score_fn)
        self._mel_fn = jax.jit(mel_fn)

    @property
    def num_compiles(self) -> int:
        return sum(self.compiles.values())

    # -- inputs --------------------------------------------------------------------------------

    def _audio_chunks(self, a) -> tuple[str, np.ndarray]:
        """One audio -> ("waves", (k, 480000)) or ("mel", (k, n_mels, 3000))."""
        if isinstance(a, (list, tuple)):
            return "waves", audio_lib.pad_chunks([np.asarray(c, np.float32) for c in a])
        a = np.asarray(a, np.float32)
        if a.ndim == 1:
            return "waves", audio_lib.pad_chunks(audio_lib.chunk(a))
        if a.ndim == 2 and a.shape[1] == audio_lib.CHUNK_SAMPLES:
            return "waves", a
        w = self.cfg.whisper
        if a.ndim == 3 and a.shape[1:] == (w.num_mel_bins, w.num_frames):
            return "mel", a
        raise ValueError(f"an audio must be waveform chunks (k, {audio_lib.CHUNK_SAMPLES}), a list of 1-D chunks, "
                         f"a 1-D waveform or log-mel (k, {w.num_mel_bins}, {w.num_frames}); got shape {a.shape}")

    def _prepare(self, request, index: int = 0, extra_tokens: int = 0):
        """Validate one request; returns (input_ids, chunks, kind, [audio arrays])."""
        ids = [int(x) for x in request.input_ids]
        raw = getattr(request, "audios", None)
        if raw is None:
            raw = getattr(request, "chunks", ())  # a data.dataset.Sample
        kinds, arrays = set(), []
        for j, a in enumerate(raw):
            try:
                kind, arr = self._audio_chunks(a)
            except ValueError as e:
                raise ValueError(f"request {index}, audio {j}: {e}") from None
            kinds.add(kind)
            arrays.append(arr)
        if len(kinds) > 1:
            raise ValueError(f"request {index}: mixes waveform and log-mel audios; pass one kind")
        chunks_per_audio = [len(a) for a in arrays]
        n_chunks = sum(chunks_per_audio)
        if n_chunks > self.max_chunks:
            raise ValueError(f"request {index}: {n_chunks} audio chunks, more than max_chunks={self.max_chunks}")
        n_placeholders = sum(1 for x in ids if x == IMAGE_TOKEN_INDEX)
        if n_placeholders != len(arrays):
            raise ValueError(f"request {index}: {n_placeholders} <audio> placeholders ({IMAGE_TOKEN_INDEX}) but "
                             f"{len(arrays)} audios")
        length = len(ids) - n_placeholders + self.cfg.tokens_per_chunk * n_chunks + extra_tokens
        if length < 1:
            raise ValueError(f"request {index}: empty prompt")
        if length > self.buckets[-1]:
            what = "prompt + longest candidate" if extra_tokens else "prompt"
            raise ValueError(f"request {index}: {what} has {length} tokens after audio expansion, more than the "
                             f"largest bucket {self.buckets[-1]}")
        return ids, chunks_per_audio, (kinds.pop() if kinds else None), arrays

    def check(self, request) -> int:
        """Raise ValueError if ``request`` cannot be served (too long, too many chunks, bad audio);
        returns its expanded prompt length. Lets a caller turn one bad request into an error record."""
        ids, cpa, _, _ = self._prepare(request)
        return len(ids) - len(cpa) + self.cfg.tokens_per_chunk * sum(cpa)

    def _audio_input(self, kind, arrays, n_chunks: int):
        """Pad the batch's chunks to a chunk bucket and return device mel (or None for text only)."""
        if n_chunks == 0:
            return None
        c = _bucket(n_chunks, self.chunk_buckets)
        stacked = np.concatenate(arrays)
        pad = np.zeros((c - n_chunks,) + stacked.shape[1:], np.float32)
        x = np.concatenate([stacked, pad])
        return self._mel_fn(x) if kind == "waves" else jnp.asarray(x)

    def _batches(self, prepared):
        """Group requests in order: at most batch_size rows and max_batch_chunks chunks per batch."""
        batch, chunks = [], 0
        for i, p in enumerate(prepared):
            c = sum(p[1])
            if batch and (len(batch) == self.batch_size or chunks + c > self.max_batch_chunks):
                yield batch
                batch, chunks = [], 0
            batch.append(i)
            chunks += c
        if batch:
            yield batch

    # -- generation ----------------------------------------------------------------------------

    def generate(self, requests: Sequence[Request], *, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0,
                 eos_token_id: int | Sequence[int] | None = ...) -> list[GenerationOutput]:
        """Generate for every request (greedy when ``temperature == 0``), in order. Requests are
        grouped into batches of ``batch_size``; a request that cannot be served raises ValueError
        before anything runs (see :meth:`check`). ``eos_token_id=None`` disables stopping."""
        check_sampling(temperature, top_p, top_k)
        cap = self.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= cap <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={cap} must be in [1, {self.max_new_tokens}] (the generator's cache size)")
        stop_ids = _stop_array(self.eos_token_id if eos_token_id is ... else eos_token_id)
        prepared = [self._prepare(r, i) for i, r in enumerate(requests)]
        kinds = {p[2] for p in prepared} - {None}
        if len(kinds) > 1:
            raise ValueError("the requests mix waveform and log-mel audios; pass one kind per call")
        out: list[GenerationOutput | None] = [None] * len(requests)
        state = nnx.state(self.model)
        pending = None  # (idx, device result): fetched after the next batch is dispatched, so the host
        # prepares batch k+1 while the device runs batch k
        for idx in self._batches(prepared):
            b = self.batch_size
            rows = []
            offset = 0
            for i in idx:
                ids, cpa, _, _ = prepared[i]
                e_ids, _, slots = expand_placeholders(ids, cpa, tokens_per_chunk=self.cfg.tokens_per_chunk,
                                                      chunk_offset=offset)
                offset += sum(cpa)
                rows.append((e_ids, slots))
            t = _bucket(max(len(r[0]) for r in rows), self.buckets)
            input_ids = np.full((b, t), self.pad_token_id, np.int32)
            audio_slots = np.full((b, t), -1, np.int32)
            lengths = np.ones((b,), np.int32)
            row_max = np.zeros((b,), np.int32)
            seeds = np.zeros((b,), np.uint32)
            for r, (i, (e_ids, slots)) in enumerate(zip(idx, rows)):
                input_ids[r, :len(e_ids)] = e_ids
                audio_slots[r, :len(e_ids)] = slots
                lengths[r] = len(e_ids)
                own = getattr(requests[i], "max_new_tokens", None)
                row_max[r] = cap if own is None else max(0, min(int(own), cap))
                seeds[r] = np.uint32(int(getattr(requests[i], "seed", 0)) & 0xFFFFFFFF)
            mel = self._audio_input(next(iter(kinds), None), [a for i in idx for a in prepared[i][3]], offset)
            res = self._generate_fn(
                state, input_ids, audio_slots, mel, lengths, row_max, seeds,
                np.full((b,), temperature, np.float32), np.full((b,), top_k, np.int32),
                np.full((b,), top_p, np.float32), stop_ids)
            if pending is not None:
                self._collect(*pending, out)
            pending = (idx, res)
        if pending is not None:
            self._collect(*pending, out)
        return out

    def _collect(self, idx, res, out) -> None:
        tokens, logprobs, counts, stopped, steps = jax.device_get(res)
        self.stats.update(batches=1, rows=len(idx), decode_steps=int(steps))
        for r, i in enumerate(idx):
            n = int(counts[r])
            out[i] = GenerationOutput(tokens[r, :n].copy(), logprobs[r, :n].copy(), "stop" if stopped[r] else "length")

    # -- scoring -------------------------------------------------------------------------------

    def score(self, request: Request, candidates: Sequence[Sequence[int]]) -> list[ScoreOutput]:
        """Log-likelihood of each candidate continuation after ``request``'s prompt, teacher-forced:
        one row per candidate (prompt + candidate, ``segment_ids`` marking the real tokens) in one
        forward pass without cache. For multiple-choice evaluation rank by ``total`` (or ``mean``)."""
        if not candidates:
            return []
        cands = [[int(x) for x in c] for c in candidates]
        for j, c in enumerate(cands):
            if not c or min(c) < 0:
                raise ValueError(f"candidate {j} must be a non-empty list of token ids, got {c}")
        longest = max(len(c) for c in cands)
        ids, cpa, kind, arrays = self._prepare(request, extra_tokens=longest)
        e_ids, _, slots = expand_placeholders(ids, cpa, tokens_per_chunk=self.cfg.tokens_per_chunk)
        p = len(e_ids)
        t = _bucket(p + longest, self.buckets)
        k = 1 << (longest - 1).bit_length()  # candidate length bucket: the next power of two
        mel = self._audio_input(kind, arrays, sum(cpa))
        state = nnx.state(self.model)
        out = []
        for start in range(0, len(cands), self.batch_size):
            group = cands[start:start + self.batch_size]
            b = self.batch_size
            input_ids = np.full((b, t), self.pad_token_id, np.int32)
            audio_slots = np.full((b, t), -1, np.int32)
            segment_ids = np.zeros((b, t), np.int32)
            gather_pos = np.zeros((b, k), np.int32)
            targets = np.zeros((b, k), np.int32)
            valid = np.zeros((b, k), bool)
            for r, c in enumerate(group):
                n = len(c)
                input_ids[r, :p], input_ids[r, p:p + n] = e_ids, c
                audio_slots[r, :p] = slots
                segment_ids[r, :p + n] = 1
                gather_pos[r, :n] = p - 1 + np.arange(n)
                targets[r, :n] = c
                valid[r, :n] = True
            lp = np.asarray(self._score_fn(state, input_ids, audio_slots, mel, segment_ids, gather_pos, targets,
                                           valid))
            for r, c in enumerate(group):
                tl = lp[r, :len(c)].copy()
                out.append(ScoreOutput(float(tl.astype(np.float64).sum()), tl))
        return out
