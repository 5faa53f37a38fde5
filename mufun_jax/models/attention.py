"""Scaled dot-product attention with swappable backends, chosen by a config string.

``dot_product_attention(q, k, v, *, segment_ids=None, causal, implementation="xla", interpret=False)``

Shapes: q ``(batch, q_len, num_heads, head_dim)``, k/v ``(batch, kv_len, num_kv_heads, head_dim)``
with ``num_heads % num_kv_heads == 0`` (grouped-query attention); the output has q's shape and
dtype. The scale is ``head_dim ** -0.5`` and the softmax runs in fp32 in every backend.

Masking (the training, no-KV-cache mode):
- ``causal``: query i sees keys j <= i by array index (needs ``q_len == kv_len``);
- ``segment_ids`` ``(batch, seq)`` int (self-attention only): a query sees only keys of its own
  segment; 0 marks padding. Whisper's encoder passes ``causal=False`` and no segment ids.

Padding query rows (segment 0) are don't-care but always finite. Their exact values differ
between backends: ``xla`` masks every segment-0 key (``-1e30`` logits, so the row becomes a
uniform average over the keys its query block sees), while ``pallas_tpu`` and ``cudnn`` let a segment-0 query attend
to the (causally visible) segment-0 keys, which always include itself, so no row is fully masked.
Rows with a non-zero segment agree across backends.

Backends:
- ``"blocked"`` (the CPU default through ``auto``): query blocks with a recomputing backward pass
  that never materialises the score matrix (``models/blocked_attention.py``); the same function.
- ``"xla"``: heads-first batched matmuls + masked fp32 softmax (the reference). GQA repeats k/v to
  the query heads. Causal attention runs in query blocks of
  ``XLA_QUERY_BLOCK`` that only see the keys up to their last query, which skips about half of
  the score matmuls, softmax and memory of the full square. On XLA:CPU this layout is about 3x
  faster (forward + backward) than one grouped 5-D einsum over the full square, whose backward
  pass transposes the whole score gradient (measured with ``bench/compare.py --profile``).
- ``"pallas_tpu"`` (alias ``"splash"``): the TPU Pallas splash-attention kernel
  (``jax.experimental.pallas.ops.tpu.splash_attention``), heads-first ``(heads, seq, head_dim)``
  per sample, vmapped over batch, GQA natively via ``make_splash_mha`` with fewer kv heads,
  ``CausalMask``/``FullMask`` as the static mask and ``SegmentIds`` for packing. It has a custom
  VJP (Pallas backward kernels). ``interpret=True`` runs the same kernel in Pallas interpret mode
  on CPU (for tests). Rules:
    * splash has no scale argument: q is pre-multiplied by ``head_dim ** -0.5`` (in q's dtype);
    * every block must be a multiple of 128 (TPU lanes) and divide the sequence, so each
      sequence is right-padded to a multiple of 128 and the block is the largest of
      512/256/128 that divides the padded length (1500 -> 1536, blocks of 512;
      300 -> 384, blocks of 128);
    * padded positions get segment id 0. With no user segment ids, real positions get
      segment 1, so real queries never see padded keys; the padded query rows are sliced off.
      With user segment ids, padding simply extends segment 0.
- ``"cudnn"``: ``jax.nn.dot_product_attention(..., implementation="cudnn")`` (GPU only, fp16/bf16
  only). Causality goes through ``is_causal``; segments go through a boolean
  ``(batch, 1, q_len, kv_len)`` same-segment mask, which cuDNN turns into a materialised bias
  (O(T^2) memory per sample; fine at MuFun's lengths, but packed varlen offsets would avoid it).
"""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mufun_jax.models.blocked_attention import blocked_attention
from mufun_jax.models.layers import active_mesh

_MASKED = -1e30  # as in qwen3.py: finite, so fully masked rows are uniform instead of NaN
_LANES = 128  # splash blocks must be multiples of the TPU lane width
_SPLASH_BLOCKS = (512, 256, 128)  # preferred splash block sizes, largest first

IMPLEMENTATIONS = ("xla", "blocked", "pallas_tpu", "splash", "cudnn")
XLA_QUERY_BLOCK = 512  # causal query block of the xla backend


def dot_product_attention(q, k, v, *, segment_ids=None, causal: bool, implementation: str = "xla",
                          interpret: bool = False):
    """Attention over (batch, len, heads, head_dim) arrays; see the module docstring."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; valid: {', '.join(IMPLEMENTATIONS)}")
    _check_shapes(q, k, v, segment_ids, causal)
    if implementation == "xla":
        return _xla_attention(q, k, v, segment_ids, causal)
    if implementation == "blocked":
        qh, kh, vh = _heads_first(q, k, v)
        return jnp.swapaxes(blocked_attention(qh, kh, vh, segment_ids, causal), 1, 2).astype(q.dtype)
    if implementation in ("pallas_tpu", "splash"):
        return _per_shard(lambda *a: _splash_attention(*a, causal, interpret), q, k, v, segment_ids)
    return _cudnn_attention(q, k, v, segment_ids, causal)


def resolve(impl: str, dtype=jnp.float32) -> tuple[str, bool]:
    """A run setting's ``attention_impl`` -> (implementation, interpret), at trace time.

    ``"auto"`` picks by the platform compiled for (a TPU topology in an AOT compile counts as TPU):
    splash on TPU, cuDNN on GPU when the compute dtype is 16-bit (cuDNN's flash attention has no
    fp32 path), blocked otherwise (plain JAX with a recomputing backward; on CPU its forward +
    backward is 1.4-2.3x faster than xla's). ``"splash_interpret"`` is the splash kernel in Pallas
    interpret mode (CPU tests of the model wiring)."""
    if impl == "splash_interpret":
        return "splash", True
    if impl == "auto":
        platform = target_platform()
        if platform == "tpu":
            return "splash", False
        if platform == "gpu" and jnp.dtype(dtype) in (jnp.float16, jnp.bfloat16):
            return "cudnn", False
        return "blocked", False
    return impl, False


_warned: list = []


def _per_shard(fn, q, k, v, segment_ids):
    """Run a Pallas kernel on each device's shard: under an active multi-device (data, fsdp, tensor)
    mesh (``jax.sharding.use_abstract_mesh`` or ``jax.set_mesh`` while tracing), ``shard_map`` over
    the batch (data x fsdp) and, where it divides both head counts, the heads (tensor). A custom
    call left to the SPMD partitioner would be replicated, i.e. every device would gather and
    compute the whole batch. Without such a mesh, ``fn`` as is."""
    mesh = active_mesh()
    if mesh is None:
        if jax.device_count() > 1 and not _warned:
            _warned.append(True)
            logging.getLogger(__name__).warning(
                "a Pallas attention kernel is traced without an active mesh on %d devices: XLA will replicate it "
                "(every device computes the whole batch). Trace under jax.sharding.use_abstract_mesh("
                "mesh.abstract_mesh) so that it runs per shard.", jax.device_count())
        return fn(q, k, v, segment_ids)
    batch = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
    while batch and q.shape[0] % math.prod(mesh.shape[a] for a in batch):
        batch = batch[:-1]
    batch = None if not batch else batch[0] if len(batch) == 1 else batch
    t = mesh.shape["tensor"]
    heads = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    qs, ks = P(batch, None, heads, None), P(batch, None, heads, None)
    if segment_ids is None:
        body, args, specs = (lambda q, k, v: fn(q, k, v, None)), (q, k, v), (qs, ks, ks)
    else:
        body, args, specs = fn, (q, k, v, segment_ids), (qs, ks, ks, P(batch, None))
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=qs, check_vma=False)(*args)


def target_platform() -> str:
    """The platform being compiled for: the active mesh's (AOT for a TPU topology from a CPU host
    sets a TPU mesh), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _check_shapes(q, k, v, segment_ids, causal):
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (b, t, heads, d) and k = v (b, s, kv_heads, d); got q {q.shape}, "
                         f"k {k.shape}, v {v.shape}")
    b, t, n, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(f"q {q.shape} and k {k.shape} disagree on batch/head_dim, or heads is not a "
                         f"multiple of kv_heads")
    if (causal or segment_ids is not None) and k.shape[1] != t:
        raise ValueError(f"causal / segment_ids attention is self-attention: q_len {t} != kv_len {k.shape[1]}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be (batch, seq) = {(b, t)}; got {segment_ids.shape}")


def attention_mask(q_len: int, kv_len: int, segment_ids=None, causal: bool = True, mask_padding_keys: bool = True):
    """Boolean mask broadcastable to (batch, q_len, kv_len), or None when nothing is masked.

    ``mask_padding_keys`` also drops keys of segment 0 (the xla semantics); without it a
    padding query attends to padding keys (the kernel-backend semantics).
    """
    mask = jnp.tril(jnp.ones((q_len, kv_len), bool))[None] if causal else None
    if segment_ids is not None:
        seg = segment_ids[:, :, None] == segment_ids[:, None, :]
        if mask_padding_keys:
            seg = seg & (segment_ids[:, None, :] != 0)
        mask = seg if mask is None else mask & seg
    return mask


def _heads_first(q, k, v):
    """(b, len, heads, d) -> (b, heads, len, d); k/v repeated to q's heads; q pre-scaled (no
    full-size broadcast of the scale over the scores)."""
    n, kvh, d = q.shape[2], k.shape[2], q.shape[3]
    if kvh != n:
        k, v = jnp.repeat(k, n // kvh, axis=2), jnp.repeat(v, n // kvh, axis=2)
    qh = jnp.swapaxes(q * jnp.asarray(d**-0.5, q.dtype), 1, 2)
    return qh, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _softmax_attend(qh, kh, vh, mask):
    """Heads-first attention with a boolean mask broadcastable to (b, t, s), or None."""
    scores = jnp.einsum("bhtd,bhsd->bhts", qh, kh).astype(jnp.float32)
    if mask is not None:
        scores = jnp.where(mask[:, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    return jnp.einsum("bhts,bhsd->bhtd", probs, vh)


def masked_attention(q, k, v, mask):
    """The KV-cache path (prefill, decode): (b, t, heads, d) queries over heads-first
    (b, kv_heads, s, d) keys (the cache's layout) with an explicit boolean (b, t, s) mask."""
    # grouped-query form: the keys/values are read where they lie, never repeated to q's heads or
    # transposed; over a long cache those copies cost more than the attention itself (decode).
    b, t, n, d = q.shape
    kvh = k.shape[1]
    qg = (q * jnp.asarray(d**-0.5, q.dtype)).reshape(b, t, kvh, n // kvh, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32)
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, n, d).astype(q.dtype)


def _xla_attention(q, k, v, segment_ids, causal, block: int = XLA_QUERY_BLOCK):
    t, s = q.shape[1], k.shape[1]
    qh, kh, vh = _heads_first(q, k, v)
    step = block if causal and t > block else t
    outs = []
    for lo in range(0, t, step):
        hi = min(lo + step, t)
        keys = hi if causal else s  # a causal block sees no key after its last query
        mask = (jnp.arange(lo, hi)[:, None] >= jnp.arange(keys)[None, :])[None] if causal else None
        if segment_ids is not None:
            sk = segment_ids[:, None, :keys]
            same = (segment_ids[:, lo:hi, None] == sk) & (sk != 0)
            mask = same if mask is None else mask & same
        outs.append(_softmax_attend(qh[:, :, lo:hi], kh[:, :, :keys], vh[:, :, :keys], mask))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2)
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)


# ----------------------------------------------------------------------------- splash (TPU)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def splash_block(length: int) -> tuple[int, int]:
    """(padded length, block size) for one sequence axis of the splash kernel."""
    padded = _round_up(length, _LANES)
    return padded, next(b for b in _SPLASH_BLOCKS if padded % b == 0)


@functools.lru_cache(maxsize=64)
def _splash_kernel(num_heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, causal: bool,
                   interpret: bool):
    # the Pallas TPU kernels are imported only when a run picks them (most runs never do)
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    head_mask = sm.CausalMask((q_len, kv_len)) if causal else sm.FullMask((q_len, kv_len))
    blocks = sk.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
        block_q_dq=block_q, block_kv_dq=block_kv,
    )
    # The kernel object holds its block-sparsity tables as jax arrays; build them as concrete
    # constants even when first called under jit, so the cached kernel can serve later traces.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([head_mask] * num_heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, segment_ids, causal, interpret):
    # as in _splash_kernel
    from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

    if not interpret and target_platform() != "tpu":
        raise ValueError(f"attention implementation 'pallas_tpu' needs a TPU (compiling for "
                         f"{target_platform()!r}); pass interpret=True to run the kernel in Pallas "
                         f"interpret mode, or use implementation='xla'")
    b, t, n, d = q.shape
    s = k.shape[1]
    t_pad, block_q = splash_block(t)
    s_pad, block_kv = splash_block(s)

    # splash has no softmax-scale argument: pre-scale q. Heads-first layout per sample.
    qh = jnp.swapaxes(q * jnp.asarray(d**-0.5, q.dtype), 1, 2)  # (b, n, t, d)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # (b, kv_heads, s, d)
    pad = lambda x, to: jnp.pad(x, ((0, 0), (0, 0), (0, to - x.shape[2]), (0, 0)))
    qh, kh, vh = pad(qh, t_pad), pad(kh, s_pad), pad(vh, s_pad)

    if segment_ids is not None:
        seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)))
        q_seg = kv_seg = seg
    elif t_pad != t or s_pad != s:
        q_seg = jnp.broadcast_to((jnp.arange(t_pad) < t).astype(jnp.int32), (b, t_pad))
        kv_seg = jnp.broadcast_to((jnp.arange(s_pad) < s).astype(jnp.int32), (b, s_pad))
    else:
        q_seg = kv_seg = None

    kernel = _splash_kernel(n, t_pad, s_pad, block_q, block_kv, causal, interpret)
    if q_seg is None:
        out = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1))(qh, kh, vh)
    else:
        out = jax.vmap(lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1, SegmentIds(sq, skv)))(
            qh, kh, vh, q_seg, kv_seg)
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(q.dtype)


# ----------------------------------------------------------------------------- cuDNN (GPU)


def cudnn_arguments(q, k, v, segment_ids, causal) -> dict:
    """Keyword arguments for ``jax.nn.dot_product_attention`` (everything but ``implementation``)."""
    mask = attention_mask(q.shape[1], k.shape[1], segment_ids, causal=False, mask_padding_keys=False)
    return dict(query=q, key=k, value=v, mask=None if mask is None else mask[:, None],
                scale=1.0 / math.sqrt(q.shape[-1]), is_causal=causal)


def _cudnn_attention(q, k, v, segment_ids, causal):
    if jax.default_backend() != "gpu":
        raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU (default backend is "
                         f"{jax.default_backend()!r}); use implementation='xla'")
    if q.dtype not in (jnp.float16, jnp.bfloat16):
        raise ValueError(f"attention implementation 'cudnn' supports float16/bfloat16 only; got {q.dtype}")
    out = jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, segment_ids, causal), implementation="cudnn")
    return out.astype(q.dtype)
