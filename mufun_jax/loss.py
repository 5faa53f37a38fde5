"""The training loss: next-token cross-entropy summed over label tokens, with the vocabulary
projection optionally chunked (``loss_chunk``) so the fp32 ``[tokens, vocab]`` logits never exist
at once, and, for a plain head, its gradients taken in the same pass. Sums, not means: the
trainer divides by the label count of the whole global batch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mufun_jax.config import IGNORE_INDEX
from mufun_jax.models import MuFun
from mufun_jax.models.layers import active_mesh, shard_activation


def next_token_targets(labels, segment_ids):
    """``targets[t] = labels[t+1]`` within a sample, -100 across sample boundaries and padding."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    shifted = jnp.where(same, labels[:, 1:], IGNORE_INDEX)
    return jnp.concatenate([shifted, jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def _chunked(hidden, targets, chunk: int):
    """``(chunks, batch, width, ...)`` views of hidden states and targets, with about ``chunk``
    tokens per device in each chunk (targets padded with -100). The chunks cut the sequence, not
    the batch: every chunk holds a slice of every row, so each device works on its own rows in
    every step of the scan. (Cutting the flattened tokens instead put each chunk on one device and
    made XLA all-reduce the LM head for each chunk: 2 x 192 x 1.25 GB per step at 3 rows per chip
    on v5p-128, see docs/tpu.md.)"""
    b, seq = targets.shape
    mesh = active_mesh()
    shards = 1 if mesh is None else math.gcd(b, mesh.shape["data"] * mesh.shape["fsdp"])
    chunks = 1 if chunk <= 0 else max(1, min(-(-(b // shards * seq) // chunk), seq))
    # prefer a count that divides the sequence: padded positions still cost the head's matmuls
    chunks = next((c for c in range(chunks, 2 * chunks + 1) if seq % c == 0), chunks)
    width = -(-seq // chunks)
    pad = chunks * width - seq
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, width, hidden.shape[-1]).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(b, chunks, width).swapaxes(0, 1)
    return shard_activation(h, (None, "batch", None, None)), shard_activation(t, (None, "batch", None))


def _token_nll(logits, t):
    """Per-token -log p(t) (0 where t is -100), the fp32 log-sum-exp and the validity mask. The
    gold logit is a masked sum, not a gather: a gather needs the fp32 logits written out whole
    (2.5 GB per 4096-token chunk for Qwen3), the sum fuses with the log-sum-exp's reduction."""
    valid = t != IGNORE_INDEX
    gold = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == t[..., None], logits, 0.0), axis=-1)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return jnp.where(valid, lse - gold, 0.0), lse, valid


def nll_sums(logits_fn, hidden, targets, chunk: int = 0):
    """(sum of -log p(target), number of targets) over targets != -100; ``logits_fn`` maps hidden
    states ``(batch, seq, hidden)`` to fp32 logits (``model.logits``). Any head goes through here
    (quantised, adapted); a plain one goes through :func:`fused_nll_sums`, which is cheaper.

    With ``chunk > 0`` the vocabulary projection runs on about ``chunk`` tokens per device at a
    time inside a rematerialised scan, so the fp32 ``[tokens, vocab]`` logits never exist at once."""

    def piece(h, t):
        nll, _, valid = _token_nll(logits_fn(h), t)
        return jnp.sum(nll), jnp.sum(valid).astype(jnp.float32)

    if chunk <= 0:
        return piece(hidden, targets)

    def body(acc, xs):
        s, n = jax.checkpoint(piece)(*xs)
        return (acc[0] + s, acc[1] + n), None

    (s, n), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), _chunked(hidden, targets, chunk))
    return s, n


def fused_nll_sums(head, hidden, targets, chunk: int = 0):
    """:func:`nll_sums` for a plain head matrix ``head`` (hidden, vocab), logits ``hidden @ head``
    in the head's dtype as :meth:`logits` computes them, with the gradients taken in the same pass
    over the chunks. A frozen head's gradient is never used, and XLA drops its matmul.

    Why: the loss is the last op of the step and its cotangent is a scalar, so the gradients with
    respect to the hidden states and the head (softmax minus one-hot, times the head or the hidden
    states) can be computed while the logits of a chunk exist, and scaled by that scalar later. The
    head's forward matmul then runs once instead of twice (the remat of :func:`nll_sums` recomputes
    it): 3 vocabulary matmuls per token instead of 4, 1.2 GFLOP/token less for Qwen3-8B."""
    return _fused(head, *_chunked(hidden, targets, chunk))


def _fused_body(head, grads: bool):
    def body(carry, xs):
        h, t = xs
        logits = jnp.einsum("bwd,dv->bwv", h.astype(head.dtype), head).astype(jnp.float32)  # as model.logits
        nll, lse, valid = _token_nll(logits, t)
        s, n = carry[0] + jnp.sum(nll), carry[1] + jnp.sum(valid).astype(jnp.float32)
        if not grads:
            return (s, n), None
        # d(sum nll)/d logits = softmax - one_hot(target), on valid tokens only
        hot = jnp.arange(logits.shape[-1]) == t[..., None]
        dlogits = jnp.where(valid[..., None], jnp.exp(logits - lse[..., None]) - hot, 0.0).astype(head.dtype)
        dh = jnp.einsum("bwv,dv->bwd", dlogits, head, preferred_element_type=jnp.float32).astype(h.dtype)
        dw = carry[2] + jnp.einsum("bwd,bwv->dv", h.astype(head.dtype), dlogits)
        return (s, n, dw), dh
    return body


@jax.custom_vjp
def _fused(head, h, t):
    (s, n), _ = jax.lax.scan(_fused_body(head, False), (jnp.float32(0), jnp.float32(0)), (h, t))
    return s, n


def _fused_fwd(head, h, t):
    # the head gradient is summed over the chunks in the head's dtype, as autodiff of nll_sums
    # does: an fp32 sum would add 2.5 GB per chip for Qwen3-8B in bf16
    zero = (jnp.float32(0), jnp.float32(0), jnp.zeros_like(head))
    (s, n, dw), dh = jax.lax.scan(_fused_body(head, True), zero, (h, t))
    return (s, n), (dw, dh)


def _fused_bwd(res, g):
    dw, dh = res
    return (g[0] * dw).astype(dw.dtype), (g[0] * dh).astype(dh.dtype), None  # the count has no gradient


_fused.defvjp(_fused_fwd, _fused_bwd)


def loss_sums(model: MuFun, batch: dict, loss_chunk: int = 0):
    """One packed micro-batch -> (sum of token NLL, label-token count). The log-mel of the
    waveforms runs on the device, inside ``encode_audio``. A batch without ``waves`` is text only
    (the LLM alone: what the TPU comparison with MaxText compiles)."""
    audio = model.encode_audio(batch["waves"]) if "waves" in batch else None
    embeds = model.embed_inputs(batch["input_ids"], audio, batch["audio_slots"] if audio is not None else None)
    hidden, _ = model.hidden_states(embeds, batch["positions"], batch["segment_ids"])
    targets = next_token_targets(batch["labels"], batch["segment_ids"])
    head = model.head_matrix()
    if head is None:  # quantised or adapted head
        return nll_sums(model.logits, hidden, targets, loss_chunk)
    return fused_nll_sums(head, hidden, targets, loss_chunk)
