"""The engine's inputs and caches: request validation, the audio cache and the prefix cache.

A mixin of :class:`mufun_jax.engine.Generator`, kept apart so that the scheduling loop
(engine.py) and what feeds it (here) each fit a reading: how a request is checked, how its audio
is encoded once (with waiting songs' audio filling the encoder's padding), and how its prompt
prefix's keys and values are computed once for every question about the same audio.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from mufun_jax import audio as audio_lib
from mufun_jax.config import IMAGE_TOKEN_INDEX
from mufun_jax.generate import bucket
from mufun_jax.lru import LRUCache
from mufun_jax.models.qwen3 import KVCache
from mufun_jax.splice import expand_placeholders


def _stops(job, token: int) -> bool:
    return token in job.params.stop_token_ids[0]


class _Job:
    """One request on its way: validated inputs, cache keys, and its answer so far."""

    __slots__ = ("index", "ids", "arrays", "kinds", "keys", "cpa", "cut", "prefix_key", "row_max", "params", "tokens",
                 "logprobs", "slot")

    def __init__(self, index, ids, arrays, kinds, keys, row_max, params):
        self.index, self.ids, self.arrays, self.kinds, self.keys = index, ids, arrays, kinds, keys
        self.cpa = [len(a) for a in arrays]
        audio_at = [i for i, x in enumerate(ids) if x == IMAGE_TOKEN_INDEX]
        self.cut = audio_at[-1] + 1 if audio_at else 0  # prefix = ids[:cut], suffix = ids[cut:]
        self.prefix_key = (tuple(ids[:self.cut]), tuple(keys))
        self.row_max, self.params = row_max, params  # params: a one-row SamplingParams of arrays
        self.tokens, self.logprobs, self.slot = [], [], None


class EngineInputs:
    """Validation and the two caches; see :class:`mufun_jax.engine.Generator` for the attributes."""

    def cache_stats(self) -> dict:
        """Per cache: ``used`` (audios, or prefixes, that admitted requests needed), ``computed``
        (encoded, or prefilled), ``reused`` (the rest: from the cache or a request admitted with it),
        and the LRU's own ``hits``, ``misses``, ``entries`` and ``bytes``."""
        st = self.stats
        audio_used, prefix_used = st["audio_used"], st["prefix_reused"] + st["prefix_computed"]
        return {"audio": dict(self.audio_cache.stats(), used=audio_used, computed=st["audio_encoded"],
                              reused=max(audio_used - st["audio_encoded"], 0)),
                "prefix": dict(self.prefix_cache.stats(), used=prefix_used, computed=st["prefix_computed"],
                               reused=st["prefix_reused"])}

    def clear_caches(self) -> None:
        """Forget every cached audio embedding and prefix (e.g. after the weights changed)."""
        self.audio_cache = LRUCache(self.audio_cache.max_bytes)
        self.prefix_cache = LRUCache(self.prefix_cache.max_bytes)

    # -- inputs --------------------------------------------------------------------------------

    def _prepare(self, request, index: int = 0, extra_tokens: int = 0):
        """Validate one request; returns (input_ids, chunks per audio, kinds, [audio arrays], keys)."""
        ids = [int(x) for x in request.input_ids]
        raw = getattr(request, "audios", None)
        if raw is None:
            raw = getattr(request, "chunks", ())  # a data.dataset.Sample
        kinds, arrays = [], []
        for j, a in enumerate(raw):
            try:
                kind, arr = audio_lib.engine_input(a, self.cfg.whisper)
            except ValueError as e:
                raise ValueError(f"request {index}, audio {j}: {e}") from None
            kinds.append(kind)
            arrays.append(arr)
        keys = getattr(request, "audio_keys", None)
        if keys is None:
            keys = [(kind, arr.shape, hashlib.blake2b(arr.tobytes(), digest_size=16).hexdigest())
                    for kind, arr in zip(kinds, arrays)]
        elif len(keys) != len(arrays):
            raise ValueError(f"request {index}: {len(keys)} audio_keys for {len(arrays)} audios")
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
        return ids, chunks_per_audio, kinds, arrays, list(keys)

    def check(self, request) -> int:
        """Raise ValueError if ``request`` cannot be served (too long, too many chunks, bad audio);
        returns its expanded prompt length. Lets a caller turn one bad request into an error record."""
        ids, cpa, _, _, _ = self._prepare(request)
        return len(ids) - len(cpa) + self.cfg.tokens_per_chunk * sum(cpa)

    def _embeds(self, state, jobs: list[_Job], spare: Sequence[_Job] = ()) -> dict:
        """The audio embeddings of ``jobs`` by key: from the audio cache, or encoded (batched by
        kind) and put there. The dict holds them for this admission even if the cache cannot.

        An encoder batch is padded to a chunk bucket. Rather than encode zeros, the padding rows
        take the audios of ``spare`` (requests waiting for a slot) that fit whole; their embeddings
        go to the audio cache, where those requests find them when admitted."""
        todo: dict = {}
        found: dict = {}
        for job in jobs:
            for key, kind, arr in zip(job.keys, job.kinds, job.arrays):
                if key in todo or key in found:
                    continue
                emb = self.audio_cache.get(key)
                if emb is None:
                    todo[key] = (kind, arr)
                else:
                    found[key] = emb
                    self.stats["audio_cache_hits"] += 1
        for kind in ("waves", "mel"):
            items = [(k, a) for k, (kd, a) in todo.items() if kd == kind]
            while items:  # chunk budget per call: the largest chunk bucket
                group, n = [], 0
                while items and (not group or n + len(items[0][1]) <= self.chunk_buckets[-1]):
                    group.append(items.pop(0))
                    n += len(group[-1][1])
                c = bucket(n, self.chunk_buckets)
                fill = self._spare_audios(spare, kind, c - n, todo, found) if c > n else []
                group += fill
                n += sum(len(a) for _, a in fill)
                self.stats["audio_prefetched"] += len(fill)
                self.stats["encoder_chunks"] += n
                self.stats["encoder_padding"] += c - n
                x = np.concatenate([a for _, a in group])
                x = np.concatenate([x, np.zeros((c - n,) + x.shape[1:], np.float32)])
                emb = self._timed("encode", self._encode, state, x)
                at = 0
                for k, a in group:
                    found[k] = emb[at:at + len(a)]
                    self.audio_cache.put(k, found[k])
                    at += len(a)
                self.stats["audio_encoded"] += len(group)
        return found

    def _spare_audios(self, spare: Sequence[_Job], kind: str, room: int, todo: dict, found: dict) -> list:
        """Audios of waiting requests, of ``kind``, not encoded yet, that fit whole in ``room`` chunks."""
        if self.audio_cache.max_bytes <= 0:  # nothing could keep them until their request is admitted
            return []
        out, taken = [], set()
        for job in spare:
            for key, kd, arr in zip(job.keys, job.kinds, job.arrays):
                if (kd != kind or len(arr) > room or key in todo or key in found or key in taken
                        or key in self.audio_cache):
                    continue
                out.append((key, arr))
                taken.add(key)
                room -= len(arr)
        return out

    def _prefixes(self, state, jobs: list[_Job], spare: Sequence[_Job] = ()) -> dict:
        """The prefix keys/values of ``jobs`` by prefix key: from the prefix cache, or computed
        (batched by length bucket) and put there; held for this admission even if the cache cannot."""
        tpc = self.cfg.tokens_per_chunk
        todo, found = {}, {}
        for job in jobs:
            if job.cut == 0 or job.prefix_key in found or job.prefix_key in todo:
                continue
            pre = self.prefix_cache.get(job.prefix_key)
            if pre is None:
                todo[job.prefix_key] = job
            else:
                found[job.prefix_key] = pre
        self.stats["prefix_reused"] += sum(1 for j in jobs if j.cut) - len(todo)  # from the cache or a sibling
        embeds = self._embeds(state, list(todo.values()), spare)  # only the audios of prefixes to compute
        by_bucket = collections.defaultdict(list)
        for job in todo.values():
            n = job.cut - len(job.cpa) + tpc * sum(job.cpa)
            by_bucket[bucket(n, self.buckets)].append(job)
        for length, group in by_bucket.items():
            for start in range(0, len(group), self.prefill_batch):
                part = group[start:start + self.prefill_batch]
                b = bucket(len(part), self.batch_sizes)
                ids = np.full((b, length), self.pad_token_id, np.int32)
                slots = np.full((b, length), -1, np.int32)
                embs, offset, lens = [], 0, []
                for r, job in enumerate(part):
                    e_ids, _, s = expand_placeholders(job.ids[:job.cut], job.cpa, tokens_per_chunk=tpc,
                                                      chunk_offset=offset)
                    ids[r, :len(e_ids)], slots[r, :len(e_ids)] = e_ids, s
                    embs += [embeds[k] for k in job.keys]
                    offset += sum(job.cpa)
                    lens.append(len(e_ids))
                c = bucket(offset, self.chunk_buckets)
                emb = jnp.concatenate(embs + ([jnp.zeros((c - offset,) + embs[0].shape[1:], embs[0].dtype)]
                                              if c > offset else []))
                kv = self._timed("prefill", self._prefix, state, ids, slots, emb)
                for r, job in enumerate(part):
                    found[job.prefix_key] = (KVCache(kv.k[:, r], kv.v[:, r]), lens[r])
                    self.prefix_cache.put(job.prefix_key, found[job.prefix_key])
                self.stats["prefix_computed"] += len(part)
        return found

