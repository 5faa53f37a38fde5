"""Sampling settings as one value: :class:`SamplingParams`, and the device code that applies them.

Why one value: a sampling option used to be a positional argument of every layer (CLI, API,
engine, device functions, AOT driver), so adding one touched about 15 places. Now the CLI and the
API build a ``SamplingParams`` once; the engine keeps one per decode slot and hands the device a
``SamplingParams`` whose fields are per-row arrays (:meth:`SamplingParams.rows`); the device code
reads the fields by name. Adding an option means a field, its check, and its use in
:func:`filter_logits` (plus a CLI flag), all in this file and cli.py.

The filters follow HF transformers' logits warpers, applied in HF's order: temperature, top-k,
top-p, then min-p (``MinPLogitsWarper``: drop tokens whose probability is below ``min_p`` times the
most likely token's). ``temperature == 0`` is greedy and ignores the filters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

STOP_PAD = 8  # stop-id arrays are padded to a multiple of this, so their count rarely changes the shape

# Older keyword names (HF generate's) that callers may still pass for a field.
ALIASES = {"max_new_tokens": "max_tokens", "eos_token_id": "stop_token_ids"}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples. On the host the fields are Python scalars; inside jit (after
    :meth:`rows`) each is an array with one row per batch row.

    ``temperature`` 0 is greedy; ``top_k`` 0, ``top_p`` 1 and ``min_p`` 0 disable their filters;
    ``seed`` keys the request's sampling, so its answer does not depend on the batch it lands in;
    ``max_tokens`` caps the answer (None: the engine's cap); ``stop_token_ids`` end it (None: the
    model's end tokens; ``()``: never stop early)."""

    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    seed: Any = 0
    max_tokens: Any = None
    stop_token_ids: Any = None

    def __post_init__(self):
        if isinstance(self.temperature, (int, float)):  # host form only: row arrays are checked when built
            self.check()

    def check(self) -> None:
        """Raise ValueError naming every bad setting."""
        stops = self.stop_token_ids
        bad = [f"{name}={v!r} {why}" for name, v, ok, why in (
            ("temperature", self.temperature, self.temperature >= 0, "must be >= 0 (0 is greedy)"),
            ("top_k", self.top_k, int(self.top_k) == self.top_k and self.top_k >= 0, "must be an integer >= 0 (0 disables it)"),
            ("top_p", self.top_p, 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_p", self.min_p, 0.0 <= self.min_p <= 1.0, "must be in [0, 1] (0 disables it)"),
            ("seed", self.seed, int(self.seed) == self.seed and self.seed >= 0, "must be an integer >= 0"),
            ("max_tokens", self.max_tokens, self.max_tokens is None or self.max_tokens >= 1, "must be >= 1"),
            ("stop_token_ids", stops, stops is None or all(int(t) >= 0 for t in _as_list(stops)),
             "must be token ids >= 0")) if not ok]
        if bad:
            raise ValueError("; ".join(bad))

    @classmethod
    def from_kwargs(cls, base: SamplingParams | None = None, **kw) -> SamplingParams:
        """``base`` (default: greedy) with the given fields replaced; ``None`` values keep the base's
        value, and HF's names (``max_new_tokens``, ``eos_token_id``) are accepted. An unknown name
        is an error that lists the known ones."""
        base = base or cls()
        names = {f.name for f in dataclasses.fields(cls)}
        out = {}
        for k, v in kw.items():
            if k == "eos_token_id" and v is None:
                v = ()  # HF's eos_token_id=None: never stop early
            k = ALIASES.get(k, k)
            if k not in names:
                raise TypeError(f"unknown sampling setting {k!r}; known: {sorted(names)}")
            if v is not None or k == "stop_token_ids":
                out[k] = v
        return dataclasses.replace(base, **out)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @staticmethod
    def rows(params: Sequence[SamplingParams], default_stops=None, cap: int = 0) -> SamplingParams:
        """Stack host params into per-row arrays for the device: ``stop_token_ids`` None becomes
        ``default_stops``; ``max_tokens`` None becomes ``cap``."""
        cols = {}
        for f in dataclasses.fields(SamplingParams):
            vals = [getattr(p, f.name) for p in params]
            if f.name == "stop_token_ids":
                lists = [_as_list(default_stops if v is None else v) for v in vals]
                width = max([STOP_PAD] + [math.ceil(len(x) / STOP_PAD) * STOP_PAD for x in lists])
                cols[f.name] = np.asarray([x + [-1] * (width - len(x)) for x in lists], np.int32).reshape(
                    len(params), width)
            elif f.name == "max_tokens":
                cols[f.name] = np.asarray([cap if v is None else min(int(v), cap) if cap else int(v) for v in vals],
                                          np.int32)
            elif f.name == "seed":
                cols[f.name] = np.asarray([int(v) & 0xFFFFFFFF for v in vals], np.uint32)
            else:
                cols[f.name] = np.asarray(vals, np.int32 if isinstance(f.default, int) else np.float32)
        return SamplingParams(**cols)

    def set_row(self, i: int, row: SamplingParams) -> None:
        """Copy row 0 of ``row`` (per-row arrays) into row ``i`` of these host arrays."""
        for f in dataclasses.fields(self):
            mine, theirs = getattr(self, f.name), getattr(row, f.name)
            if mine.ndim == 2 and theirs.shape[1] != mine.shape[1]:
                raise ValueError(f"{theirs.shape[1]} stop ids do not fit this batch's {mine.shape[1]}")
            mine[i] = theirs[0]


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    if isinstance(ids, (int, np.integer)):
        return [int(ids)]
    return [int(t) for t in ids]


def stop_array(eos_token_id) -> np.ndarray:
    """Stop ids as a fixed-size int32 array padded with -1 (a shape that rarely changes)."""
    ids = _as_list(eos_token_id)
    n = max(STOP_PAD, math.ceil(len(ids) / STOP_PAD) * STOP_PAD)
    return np.asarray(ids + [-1] * (n - len(ids)), np.int32)


# -- on the device ---------------------------------------------------------------------------------


def filter_logits(logits, p: SamplingParams):
    """HF's TopK, TopP and MinP warpers with per-row settings (``p``'s fields are (B,) arrays);
    removed entries become -inf. One descending sort serves all three."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, v), v).astype(jnp.int32)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    logits = jnp.where(logits < kth, -jnp.inf, logits)
    desc = jnp.where(jnp.arange(v)[None, :] < k[:, None], desc, -jnp.inf)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
    keep = (before < p.top_p[:, None]) | (p.top_p[:, None] >= 1.0)
    n_keep = jnp.maximum(keep.sum(-1), 1)  # the most likely token is always kept
    thr = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    logits = jnp.where(logits < thr, -jnp.inf, logits)
    # min-p on the distribution left by top-k/top-p: probability >= min_p * the top probability,
    # i.e. logit >= top logit + log(min_p) (softmax's normaliser cancels)
    floor = desc[:, :1] + jnp.log(jnp.maximum(p.min_p, 1e-30))[:, None]
    return jnp.where((p.min_p[:, None] > 0) & (logits < floor), -jnp.inf, logits)


def choose_tokens(logits, keys, step, p: SamplingParams):
    """Next token per row (greedy where ``temperature == 0``) and its log-probability under the
    raw model distribution. ``step`` (scalar or per row) is folded into each row's key, so a
    request's sample depends on its seed and position only. The sort that sampling needs runs
    only if some row samples."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(_):
        t = jnp.where(p.temperature > 0, p.temperature, 1.0)
        warped = filter_logits(logits / t[:, None], p)
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), greedy.shape)
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        drawn = jax.vmap(jax.random.categorical)(step_keys, warped).astype(jnp.int32)
        return jnp.where(p.temperature > 0, drawn, greedy)

    tok = jax.lax.cond(jnp.any(p.temperature > 0), sample, lambda _: greedy, None)
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
    return tok, lp


def row_keys(p: SamplingParams):
    """One PRNG key per row, from its seed."""
    return jax.vmap(jax.random.key)(p.seed)


def is_stop(tok, p: SamplingParams):
    """Whether each row's token is one of its stop ids."""
    return jnp.any(tok[:, None] == p.stop_token_ids, axis=-1)
