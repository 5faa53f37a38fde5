"""Teacher-forced scoring: the log-likelihood of candidate answers after a prompt, for multiple
choice (rank by ``total``) and evaluation by likelihood. One row per candidate (prompt +
candidate, ``segment_ids`` marking the real tokens) in one forward pass without a KV cache, so it
shares nothing with continuous batching but the engine's validation, buckets and compiled
scoring program (``Generator._score``)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from flax import nnx

from mufun_jax.generate import Request, ScoreOutput, bucket
from mufun_jax.splice import expand_placeholders


def score(gen, request: Request, candidates: Sequence[Sequence[int]]) -> list[ScoreOutput]:
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
    ids, cpa, kinds, arrays, _ = gen._prepare(request, extra_tokens=longest)
    if len(set(kinds)) > 1:
        raise ValueError("score: the request mixes waveform and log-mel audios; pass one kind")
    e_ids, _, slots = expand_placeholders(ids, cpa, tokens_per_chunk=gen.cfg.tokens_per_chunk)
    p = len(e_ids)
    t = bucket(p + longest, gen.buckets)
    k = 1 << (longest - 1).bit_length()  # candidate length bucket: the next power of two
    audio = None
    if arrays:
        n = sum(cpa)
        x = np.concatenate(arrays)
        audio = np.concatenate([x, np.zeros((bucket(n, gen.chunk_buckets) - n,) + x.shape[1:], np.float32)])
    state = nnx.state(gen.model)
    out = []
    b = gen.batch_size
    for start in range(0, len(cands), b):
        group = cands[start:start + b]
        input_ids = np.full((b, t), gen.pad_token_id, np.int32)
        audio_slots = np.full((b, t), -1, np.int32)
        segment_ids = np.zeros((b, t), np.int32)
        gather_pos, targets = np.zeros((b, k), np.int32), np.zeros((b, k), np.int32)
        valid = np.zeros((b, k), bool)
        for r, c in enumerate(group):
            n = len(c)
            input_ids[r, :p], input_ids[r, p:p + n] = e_ids, c
            audio_slots[r, :p] = slots
            segment_ids[r, :p + n] = 1
            gather_pos[r, :n] = p - 1 + np.arange(n)
            targets[r, :n] = c
            valid[r, :n] = True
        lp = np.asarray(gen._score(state, input_ids, audio_slots, audio, segment_ids, gather_pos, targets, valid))
        for r, c in enumerate(group):
            tl = lp[r, :len(c)].copy()
            out.append(ScoreOutput(float(tl.astype(np.float64).sum()), tl))
    return out
