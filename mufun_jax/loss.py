"""The training loss: next-token cross-entropy summed over label tokens, with the vocabulary
projection optionally chunked (``loss_chunk``) so the fp32 ``[tokens, vocab]`` logits never exist
at once. Sums, not means: the trainer divides by the label count of the whole global batch."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mufun_jax.config import IGNORE_INDEX
from mufun_jax.models import MuFun
from mufun_jax.models.layers import active_mesh, gather_fsdp, shard_activation


def next_token_targets(labels, segment_ids):
    """``targets[t] = labels[t+1]`` within a sample, -100 across sample boundaries and padding."""
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    shifted = jnp.where(same, labels[:, 1:], IGNORE_INDEX)
    return jnp.concatenate([shifted, jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def nll_sums(logits_fn, hidden, targets, chunk: int = 0):
    """(sum of -log p(target), number of targets) over targets != -100; ``logits_fn`` maps hidden
    states ``(batch, seq, hidden)`` to fp32 logits (``model.logits``).

    With ``chunk > 0`` the vocabulary projection runs on about ``chunk`` tokens per device at a
    time inside a rematerialised scan, so the fp32 ``[tokens, vocab]`` logits never exist at once.
    The chunks cut the sequence, not the batch: every chunk holds a slice of every row, so each
    device works on its own rows in every step of the scan. (Cutting the flattened tokens instead
    put each chunk on one device and made XLA all-reduce the LM head for each chunk: 2 x 192 x
    1.25 GB per step at 3 rows per chip on v5p-128, see docs/tpu.md.)"""

    def piece(h, t):
        logits = logits_fn(h)
        valid = t != IGNORE_INDEX
        gold = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], axis=-1)[..., 0]
        nll = jax.nn.logsumexp(logits, axis=-1) - gold
        return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)

    b, seq = targets.shape
    mesh = active_mesh()
    shards = 1 if mesh is None else math.gcd(b, mesh.shape["data"] * mesh.shape["fsdp"])
    local_tokens = b // shards * seq
    chunks = 0 if chunk <= 0 else min(-(-local_tokens // chunk), seq)
    if chunks <= 1:
        return piece(hidden, targets)
    width = -(-seq // chunks)
    pad = chunks * width - seq
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, chunks, width, hidden.shape[-1]).swapaxes(0, 1)
    t = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX).reshape(b, chunks, width).swapaxes(0, 1)
    h, t = shard_activation(h, (None, "batch", None, None)), shard_activation(t, (None, "batch", None))

    def body(acc, xs):
        s, n = jax.checkpoint(piece)(*xs)
        return (acc[0] + s, acc[1] + n), None

    (s, n), _ = jax.lax.scan(body, (jnp.float32(0), jnp.float32(0)), (h, t))
    return s, n


def gather_lm_head(model: MuFun) -> None:
    """FSDP: cast the LM head to its compute dtype and gather it once, before the chunked loss.
    Inside the chunk scan XLA gathered it again for every chunk, in the forward, remat and backward
    passes (3 x 1.25 GB per chunk for Qwen3-8B), so the collectives grew with the rows per chip.
    Quantised or adapted heads are left alone. ``model`` is the step's own (merged) module."""
    lm = model.language_model
    head = lm.embed_tokens if lm.lm_head is None else lm.lm_head
    var = head.embedding if lm.lm_head is None else head.kernel
    mesh = active_mesh()
    if (mesh is None or mesh.shape["fsdp"] == 1 or getattr(head, "kernel_scale", None) is not None
            or getattr(head, "embedding_scale", None) is not None or getattr(head, "lora_a", None) is not None
            or not jnp.issubdtype(var.dtype, jnp.floating)):
        return
    var.set_value(gather_fsdp(var[...].astype(head.dtype), var.get_metadata("logical_axes")))


def loss_sums(model: MuFun, batch: dict, loss_chunk: int = 0):
    """One packed micro-batch -> (sum of token NLL, label-token count). The log-mel of the
    waveforms runs on the device, inside ``encode_audio``. A batch without ``waves`` is text only
    (the LLM alone: what the TPU comparison with MaxText compiles)."""
    audio = model.encode_audio(batch["waves"]) if "waves" in batch else None
    embeds = model.embed_inputs(batch["input_ids"], audio, batch["audio_slots"] if audio is not None else None)
    hidden, _ = model.hidden_states(embeds, batch["positions"], batch["segment_ids"])
    if loss_chunk > 0:
        gather_lm_head(model)
    return nll_sums(model.logits, hidden, next_token_targets(batch["labels"], batch["segment_ids"]), loss_chunk)
