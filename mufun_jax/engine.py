"""The generation engine: continuous batching over a fixed set of decode slots, each song encoded
once for all its questions, and prefix KV reuse. Built for dataset-scale inference: tagging,
captioning and transcribing large collections with several questions per song.

How a request runs:
1. **Audio, once.** Each audio is known by a key: a hash of its samples (the API hashes the decoded,
   cropped samples, so one song under two paths is one entry), or a caller's own id
   (``Request.audio_keys``). Its connector output is computed once and kept in an LRU cache
   bounded in bytes (``audio_cache_bytes``), so every question about a song reuses it.
2. **Prefix, once.** A prompt splits at its last ``<audio>``: the prefix (system prompt, ``USER:``,
   the audio tokens) and the suffix (the question, ``ASSISTANT:``). The prefix's keys and values
   are computed once per (prefix tokens, audios) and kept in a second LRU cache
   (``prefix_cache_bytes``); each request then prefills only its suffix on top of them.
3. **Continuous batching.** ``batch_size`` decode slots share one preallocated KV cache of
   ``buckets[-1] + max_new_tokens`` positions. A device loop advances every slot up to
   ``decode_steps`` tokens and returns as soon as one finishes; the host then prefills the next
   waiting request into that slot while the others keep their place. Short answers never wait for
   long ones, and long audio or long answers run beside short ones. A decode call attends only to
   the cache's leading ``span`` slots, the smallest of ``spans`` (multiples of ``span_step``) above
   every live slot's position: on CPU a step's cost grows with the slots it reads.

Static shapes: prefix lengths are padded to ``buckets``, suffix lengths to ``suffix_buckets``,
admission batches to powers of two up to ``prefill_batch``, and a batch's audio chunks to
``chunk_buckets``, decode spans to ``spans``; the slot count and the cache length are fixed. So a
run compiles a bounded set of programs and a steady-state run compiles nothing (``compiles``
counts traces). Sampling settings, seeds, stop ids and per-request limits are arrays, not constants.

Scoring (teacher-forced log-likelihood of candidates) runs one forward pass without a cache.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from typing import Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mufun_jax.compile_cache import enable_compile_cache
from mufun_jax import generate as dev
from mufun_jax.config import ENDOFTEXT_ID, IM_END_ID
from mufun_jax import scoring
from mufun_jax.generate import GenerationOutput, Request, ScoreOutput, bucket, pow2_upto
from mufun_jax.lru import LRUCache
from mufun_jax.models.qwen3 import KVCache
from mufun_jax.sampling import SamplingParams
from mufun_jax.engine_inputs import EngineInputs, _Job, _stops

DEFAULT_EOS_TOKEN_ID = (IM_END_ID, ENDOFTEXT_ID)  # `<|im_end|>` ends an instruct answer, `<|endoftext|>` a base one
class Generator(EngineInputs):
    """Continuous-batching generation and batched scoring for a :class:`~mufun_jax.models.MuFun`
    (see the module docstring).

    ``batch_size`` is the number of decode slots; ``max_new_tokens`` caps every answer and sizes the
    cache; ``buckets`` are the padded prompt (prefix) lengths, audio slots included;
    ``max_chunks`` limits one request's 30 s chunks (default: as many as fit the largest bucket);
    ``prefill_chunk`` (dividing the buckets) runs prefix prefills in pieces to bound their memory.
    ``span_step`` sets the decode spans' granularity (default: an eighth of the cache, at least 512).
    ``eos_token_id`` is the default stop set. ``compiles`` counts traces of each jitted function;
    ``stats`` counts requests, cache hits and decode steps; with ``profile=True`` ``timings`` holds
    the seconds spent encoding audio, prefilling and decoding (each phase waits for the device).

    The model's current state is read at every call; the caches are keyed by inputs, not weights,
    so call :meth:`clear_caches` after changing the weights.
    """

    def __init__(self, model, *, max_new_tokens: int = 256, batch_size: int = 8,
                 buckets: Sequence[int] = (256, 512, 1024, 2048, 4096), max_chunks: int | None = None,
                 chunk_buckets: Sequence[int] | None = None, suffix_buckets: Sequence[int] | None = None,
                 prefill_batch: int | None = None, decode_steps: int = 16,
                 eos_token_id: int | Sequence[int] | None = DEFAULT_EOS_TOKEN_ID, pad_token_id: int | None = None,
                 prefill_chunk: int | None = None, audio_cache_bytes: int = 256 << 20,
                 prefix_cache_bytes: int = 1 << 30, profile: bool = False, max_batch_chunks: int | None = None,
                 span_step: int | None = None):
        if max_new_tokens < 1 or batch_size < 1 or decode_steps < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}, batch_size={batch_size} and decode_steps="
                             f"{decode_steps} must be >= 1")
        if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 1:
            raise ValueError(f"buckets={list(buckets)} must be strictly increasing positive lengths")
        enable_compile_cache()  # the engine's programs are the same every run (mufun_jax/compile_cache.py)
        self.model, self.cfg = model, model.cfg
        self.max_new_tokens, self.batch_size = int(max_new_tokens), int(batch_size)
        self.buckets = tuple(int(b) for b in buckets)
        self.suffix_buckets = tuple(suffix_buckets) if suffix_buckets is not None else tuple(sorted(
            {b for b in (16, 32, 64, 128) if b < self.buckets[-1]} | {b for b in self.buckets if b > 128}
            | {self.buckets[-1]}))
        if list(self.suffix_buckets) != sorted(set(self.suffix_buckets)) or self.suffix_buckets[-1] < self.buckets[-1]:
            raise ValueError(f"suffix_buckets={list(self.suffix_buckets)} must increase and reach the largest bucket "
                             f"{self.buckets[-1]}")
        tpc = self.cfg.tokens_per_chunk
        self.max_chunks = int(max_chunks) if max_chunks is not None else max(self.buckets[-1] // tpc, 1)
        self.prefill_batch = int(prefill_batch or batch_size)
        self.batch_sizes = pow2_upto(self.prefill_batch)
        limit = int(max_batch_chunks) if max_batch_chunks is not None else self.prefill_batch * self.max_chunks
        self.chunk_buckets = tuple(chunk_buckets) if chunk_buckets is not None else pow2_upto(limit)
        if list(self.chunk_buckets) != sorted(set(self.chunk_buckets)) or self.chunk_buckets[-1] < self.max_chunks:
            raise ValueError(f"chunk_buckets={list(self.chunk_buckets)} must increase and reach max_chunks="
                             f"{self.max_chunks}")
        if prefill_chunk is not None and (prefill_chunk < 1 or any(b % prefill_chunk for b in self.buckets
                                                                    if b > prefill_chunk)):
            raise ValueError(f"prefill_chunk={prefill_chunk} must divide every bucket longer than it "
                             f"(buckets={list(self.buckets)})")
        self.prefill_chunk = prefill_chunk
        self.decode_steps = int(decode_steps)
        self.max_len = self.buckets[-1] + self.max_new_tokens
        if span_step is not None and span_step < 1:
            raise ValueError(f"span_step={span_step} must be >= 1 (or None for the default)")
        step = span_step or max(512, -(-self.max_len // 8 // 128) * 128)
        self.spans = tuple(sorted({min(k * step, self.max_len) for k in range(1, -(-self.max_len // step) + 1)}))
        self.eos_token_id = eos_token_id
        self.pad_token_id = self.cfg.pad_token_id if pad_token_id is None else int(pad_token_id)
        self.audio_cache = LRUCache(audio_cache_bytes)
        self.prefix_cache = LRUCache(prefix_cache_bytes)
        self.profile = profile
        self.compiles: collections.Counter = collections.Counter()
        self.stats: collections.Counter = collections.Counter()
        self.timings: collections.Counter = collections.Counter()
        self.graphdef = nnx.graphdef(model)
        self._cache = None
        self._cancelled: set[int] = set()
        self.active = 0  # requests in slots or waiting, while stream runs: a server's feed reads it
        merge = lambda state: nnx.merge(self.graphdef, state)

        def counted(name, fn):
            @functools.wraps(fn)  # keeps fn's signature, which jit reads for static_argnames
            def wrapper(*args, **kw):
                self.compiles[name] += 1  # runs only while tracing
                return fn(*args, **kw)
            return wrapper

        self._encode = jax.jit(counted("encode", lambda st, x: merge(st).encode_audio(x)))
        self._prefix = jax.jit(counted("prefix", lambda st, ids, slots, emb: dev.prefix_kv(
            merge(st), ids, slots, emb, self.prefill_chunk)))
        self._prefill = jax.jit(counted("prefill", lambda st, cache, *a: dev.prefill_slots(
            merge(st), cache, *a, chunk=self.prefill_chunk)), donate_argnums=1)
        self._decode = jax.jit(counted("decode", lambda st, cache, *a, span: dev.decode_chunk(
            merge(st), cache, *a, self.decode_steps, span)), donate_argnums=1, static_argnames="span")
        self._score = jax.jit(counted("score", lambda st, *a: dev.score_positions(merge(st), *a)))

    @property
    def num_compiles(self) -> int:
        return sum(self.compiles.values())

    # -- device phases ---------------------------------------------------------------------------

    def _timed(self, phase: str, fn, *args, **kw):
        if not self.profile:
            return fn(*args, **kw)
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args, **kw))
        self.timings[phase] += time.perf_counter() - t0
        return out

    def _admit(self, state, jobs: list[_Job], spare: Sequence[_Job] = ()) -> list[_Job]:
        """Prefill ``jobs`` (each already holding a slot) into their slots; returns those finished
        by their first token. ``spare``: waiting requests whose audio may fill encoder padding."""
        self.stats["audio_used"] += sum(len(j.keys) for j in jobs)
        prefixes = self._prefixes(state, jobs, spare)
        layers, kvh, hd = self.cfg.qwen3.num_hidden_layers, self.cfg.qwen3.num_key_value_heads, self.cfg.qwen3.head_dim
        groups = collections.defaultdict(list)
        for job in jobs:
            pre = prefixes[job.prefix_key] if job.cut else None
            p_len = 0 if pre is None else pre[1]
            p_bucket = 0 if pre is None else pre[0].k.shape[2]  # (layers, kv_heads, len, head_dim)
            groups[(p_bucket, bucket(len(job.ids) - job.cut, self.suffix_buckets))].append((job, pre, p_len))
        done = []
        # Slots can free up faster than one prefill batch admits (batch_size > prefill_batch): a
        # group runs in pieces of at most prefill_batch rows, each padded to a compiled batch size.
        pieces = [(key, group[i:i + self.prefill_batch]) for key, group in groups.items()
                  for i in range(0, len(group), self.prefill_batch)]
        for (p_bucket, s_bucket), group in pieces:
            b = bucket(len(group), self.batch_sizes)
            suffix = np.full((b, s_bucket), self.pad_token_id, np.int32)
            s_len, p_len = np.ones((b,), np.int32), np.zeros((b,), np.int32)
            slots = np.full((b,), self.batch_size, np.int32)  # out of range: padding rows write nothing
            ks, vs = [], []
            for r, (job, pre, plen) in enumerate(group):
                sfx = job.ids[job.cut:]
                suffix[r, :len(sfx)] = sfx
                s_len[r], p_len[r], slots[r] = len(sfx), plen, job.slot
                if pre is not None:
                    ks.append(pre[0].k)
                    vs.append(pre[0].v)
            if p_bucket:
                pad = [jnp.zeros_like(ks[0])] * (b - len(ks))
                prefix = KVCache(jnp.stack(ks + pad, axis=1), jnp.stack(vs + pad, axis=1))
            else:
                z = jnp.zeros((layers, b, kvh, 0, hd), self._cache.k.dtype)
                prefix = KVCache(z, z)
            rows = [job.params for job, _, _ in group]
            params = jax.tree.map(lambda *xs: np.concatenate(xs), *(rows + rows[:1] * (b - len(rows))))
            tok, lp, self._cache = self._timed(
                "prefill", self._prefill, state, self._cache, slots, prefix, p_len, suffix, s_len, params)
            tok, lp = np.asarray(tok), np.asarray(lp)
            for r, (job, _, plen) in enumerate(group):
                job.tokens.append(int(tok[r]))
                job.logprobs.append(float(lp[r]))
                self._pos[job.slot] = plen + s_len[r]
                if _stops(job, int(tok[r])) or job.row_max <= 1:
                    done.append(job)
            self.stats["prefilled"] += len(group)
        return done

    def _new_cache(self):
        if self._cache is None:
            self._cache = self.model.init_cache(self.batch_size, self.max_len)

    # -- generation ----------------------------------------------------------------------------

    def stream(self, requests: Iterable[Request | None], sampling: SamplingParams | None = None, *,
               on_tokens: Callable[[int, list, list], None] | None = None,
               **kw) -> Iterator[tuple[int, GenerationOutput]]:
        """Generate for every request, yielding ``(index, output)`` as each answer completes.

        ``sampling`` (default greedy) applies to every request without its own ``Request.sampling``;
        ``kw`` replaces fields of it (``temperature=0.7``; HF's ``max_new_tokens`` and
        ``eos_token_id`` are accepted, ``eos_token_id=None`` never stops early). A list of requests
        is validated before anything runs (a bad one raises ValueError; see :meth:`check`); any
        other iterable is pulled lazily, one request whenever a slot frees, so its producer (audio
        decoding threads, a server's queue) runs alongside. Such a producer may yield ``None`` for
        "nothing new yet": the engine keeps decoding and asks again. Indices count the requests,
        not the ``None`` values. ``on_tokens(index, token_ids, logprobs)`` is called with each request's
        new tokens after every device call (streaming); :meth:`cancel` ends a request early."""
        base = SamplingParams.from_kwargs(sampling, **kw)
        cap = self.max_new_tokens if base.max_tokens is None else int(base.max_tokens)
        if not 1 <= cap <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens={cap} must be in [1, {self.max_new_tokens}] (the generator's cache size)")
        base = dataclasses.replace(base, max_tokens=cap)

        def params_of(r) -> tuple[int, SamplingParams]:
            own = getattr(r, "sampling", None)
            if own is None:
                limit = getattr(r, "max_new_tokens", None)
                own = dataclasses.replace(base, seed=int(getattr(r, "seed", 0)))
                row_max = cap if limit is None else max(0, min(int(limit), cap))
            else:
                row_max = min(cap if own.max_tokens is None else int(own.max_tokens), self.max_new_tokens)
            rows = SamplingParams.rows([own], self.eos_token_id, cap=self.max_new_tokens)
            if rows.stop_token_ids.shape[1] != self._rows.stop_token_ids.shape[1]:
                raise ValueError(f"{(rows.stop_token_ids[0] >= 0).sum()} stop token ids; at most "
                                 f"{self._rows.stop_token_ids.shape[1]} fit this generator")
            return row_max, rows

        def make_jobs():
            i = 0
            for r in requests:
                if r is None:
                    yield None
                    continue
                ids, cpa, kinds, arrays, keys = self._prepare(r, i)
                row_max, rows = params_of(r)
                self.stats["requests"] += 1
                yield _Job(i, ids, arrays, kinds, keys, row_max, rows)
                i += 1

        s = self.batch_size
        self._rows = SamplingParams.rows([base] * s, self.eos_token_id, cap=self.max_new_tokens)
        source = iter(list(make_jobs())) if isinstance(requests, Sequence) else make_jobs()
        waiting = collections.deque()
        end = object()

        def more(ahead: bool = False) -> bool:
            """Is a request waiting? Pulls one from the source when none is (or, ``ahead``, always)."""
            if ahead or not waiting:
                job = next(source, end)
                if job is not end and job is not None:
                    waiting.append(job)
                    return True
                if ahead:
                    return False
            return bool(waiting)

        state = nnx.state(self.model)
        self._new_cache()
        slot_job: list[_Job | None] = [None] * s
        self._pos = np.zeros((s,), np.int32)
        tokens, remaining, steps = np.zeros((s,), np.int32), np.zeros((s,), np.int32), np.zeros((s,), np.int32)

        def finish(job, reason):
            if job.slot is not None:
                slot_job[job.slot] = None
            self.stats["generated_tokens"] += len(job.tokens)
            self._cancelled.discard(job.index)
            return job.index, GenerationOutput(np.asarray(job.tokens, np.int32), np.asarray(job.logprobs, np.float32),
                                               reason)

        while more() or any(j is not None for j in slot_job):
            self.active = sum(j is not None for j in slot_job) + len(waiting)
            if self._cancelled:
                for job in [j for j in list(waiting) + slot_job if j is not None and j.index in self._cancelled]:
                    if job.slot is None:
                        waiting.remove(job)
                    yield finish(job, "abort")
            free = [i for i, j in enumerate(slot_job) if j is None]
            admit = []
            while free and more():
                job = waiting.popleft()
                if job.row_max == 0:
                    yield finish(job, "length")
                    continue
                job.slot = free.pop(0)
                slot_job[job.slot] = job
                admit.append(job)
            if admit:
                while len(waiting) < max(2 * self.batch_size, 16) and more(ahead=True):
                    pass  # a look-ahead (several questions per song are common): their audio fills encoder padding
                done = self._admit(state, admit, spare=list(waiting))
                if on_tokens is not None:
                    for job in admit:
                        on_tokens(job.index, job.tokens[-1:], job.logprobs[-1:])
                for job in done:
                    yield finish(job, "stop" if _stops(job, job.tokens[-1]) else "length")
                for job in admit:
                    if slot_job[job.slot] is job:
                        tokens[job.slot], remaining[job.slot], steps[job.slot] = job.tokens[-1], job.row_max - 1, 1
                        self._rows.set_row(job.slot, job.params)
            live = np.array([j is not None for j in slot_job])
            if not live.any():
                continue
            before = self._pos.copy()
            span = bucket(min(int(before[live].max()) + self.decode_steps, self.max_len), self.spans)
            out = self._timed("decode", self._decode, state, self._cache, tokens, before, live, remaining, steps,
                              self._rows, span=span)
            self._cache = out[0]
            tokens, pos, new_live, remaining, steps, out_tok, out_lp, stopped, n = map(np.array, jax.device_get(out[1:]))
            self._pos = pos
            self.stats["decode_calls"] += 1
            self.stats["decode_steps"] += int(n)
            for slot in np.flatnonzero(live):
                job = slot_job[slot]
                k = int(pos[slot] - before[slot])  # the tokens this slot generated in this call
                new_tok, new_lp = [int(t) for t in out_tok[slot, :k]], [float(x) for x in out_lp[slot, :k]]
                job.tokens += new_tok
                job.logprobs += new_lp
                if on_tokens is not None and k:
                    on_tokens(job.index, new_tok, new_lp)
                if not new_live[slot]:
                    yield finish(job, "stop" if stopped[slot] else "length")
        self.active = 0

    def cancel(self, index: int) -> None:
        """End request ``index`` of the running :meth:`stream` early (a client went away): a waiting
        request is dropped, a running one frees its slot before the next decode call. It comes out
        with ``finish_reason == "abort"``. Safe to call from another thread."""
        self._cancelled.add(int(index))

    def generate(self, requests: Sequence[Request], **kw) -> list[GenerationOutput]:
        """:meth:`stream`, collected in input order."""
        out: list[GenerationOutput | None] = [None] * len(requests)
        for i, o in self.stream(requests, **kw):
            out[i] = o
        return out

    # -- scoring -------------------------------------------------------------------------------

    def score(self, request: Request, candidates: Sequence[Sequence[int]]) -> list[ScoreOutput]:
        """Log-likelihood of each candidate continuation after ``request``'s prompt (see
        :func:`mufun_jax.scoring.score`). For multiple-choice evaluation rank by ``total``."""
        return scoring.score(self, request, candidates)
