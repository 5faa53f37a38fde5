"""Ahead-of-time compiles of MuFun's train step and inference engine for a TPU topology.

Everything is abstract (``ShapeDtypeStruct``s with shardings), so nothing is allocated. What is
compiled is what a run executes: the train step is the real ``Trainer.train_step``, and the
inference programs are the jitted functions of a real :class:`mufun_jax.engine.Generator` (built on
the abstract model), with the shapes of a run. The compiled executables tell, per chip:

- memory (``compiled.memory_analysis()``): arguments (state + batch), outputs, aliased bytes (the
  donated state), temporaries; peak = arguments + outputs - aliased + temporaries + code;
- FLOPs: read from the optimised HLO with loop trip counts multiplied out (:mod:`.hlo`), and
  compared with the model FLOPs of :mod:`mufun_jax.flops`.

If the step does not fit, the TPU compiler refuses it (``RESOURCE_EXHAUSTED ... hbm``); that is
reported as ``fits=False`` with the compiler's numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from typing import Sequence

from mufun_jax import audio, flops
from mufun_jax.checkpoint import has_model, load_config
from mufun_jax.config import preset, resolve_model
from mufun_jax.errors import CheckpointError
from mufun_jax.run_settings import RunSettings
from mufun_jax.aot.hlo import hlo_flops
from mufun_jax.aot.topology import GiB, Topology, quiet_stderr, get_topology, topology_mesh


@dataclasses.dataclass
class AotResult:
    """One compiled (or refused) step on one topology. Bytes are per chip; FLOPs per step, all chips."""

    step: str  # "train" | "prefill" | "decode"
    topology: str
    num_slices: int
    chips: int
    mesh: dict
    hbm_bytes: int  # the chip's HBM usable by a program (TpuSpec.usable_gib)
    fits: bool
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    host_temp_bytes: int = 0  # pinned host memory (remat offload)
    peak_bytes: int = 0  # argument + output - alias + temp + code
    compiled_flops: float = 0.0  # matmul FLOPs from the HLO, x chips
    model_flops: float = 0.0
    kernel_calls: int = 0  # Pallas custom-call sites (their FLOPs are added from the model count)
    kernel_flops: float = 0.0  # attention FLOPs done inside kernels (analytic), included in compiled_flops
    unknown_trip_counts: int = 0
    hbm_access_bytes: float = 0.0  # HBM bytes read + written per chip per step (roofline model, :mod:`.hlo`)
    link_bytes: float = 0.0  # bytes each chip sends over ICI/DCN per step for collectives (ring model)
    collective_bytes: dict = dataclasses.field(default_factory=dict)  # kind -> payload bytes per chip
    tokens: int = 0  # tokens per step (train: all micro-batches; prefill: batch x context; decode: batch)
    lower_s: float = 0.0
    compile_s: float = 0.0
    detail: str = ""  # configuration summary, or the compiler's out-of-memory message
    program: object = dataclasses.field(default=None, repr=False, compare=False)  # the jitted callable compiled
    notes: list = dataclasses.field(default_factory=list)

    @property
    def hbm_free(self) -> float:
        return 1.0 - self.peak_bytes / self.hbm_bytes

    @property
    def flops_ratio(self) -> float:
        return self.compiled_flops / self.model_flops if self.model_flops else float("nan")



def _memory(result: AotResult, compiled) -> None:
    m = compiled.memory_analysis()
    result.argument_bytes = int(m.argument_size_in_bytes)
    result.output_bytes = int(m.output_size_in_bytes)
    result.alias_bytes = int(m.alias_size_in_bytes)
    result.temp_bytes = int(m.temp_size_in_bytes)
    result.code_bytes = int(m.generated_code_size_in_bytes)
    result.host_temp_bytes = int(getattr(m, "host_temp_size_in_bytes", 0) or 0)
    result.peak_bytes = (result.argument_bytes + result.output_bytes - result.alias_bytes + result.temp_bytes
                         + result.code_bytes)


_OOM = (re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm", re.I),
        re.compile(r"required for [^(]*\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)", re.I))


def _oom_bytes(msg: str) -> tuple[int, int] | None:
    """(bytes needed, bytes available) from the TPU compiler's out-of-memory message."""
    unit = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    for pattern in _OOM:
        m = pattern.search(msg)
        if m:
            return (int(float(m.group(1)) * unit[m.group(2).upper()]),
                    int(float(m.group(3)) * unit[m.group(4).upper()]))
    return None


def compile_step(result: AotResult, jitted, args, mesh, *, attention_flops: float = 0.0):
    """Lower + compile under the mesh (so the model's activation constraints and the kernel's
    shard_map see it), then fill in memory and FLOPs. An HBM overflow becomes ``fits=False``."""
    # jax, and our modules that import it, only here: the CLIs set JAX_PLATFORMS first (read on import)
    import jax

    t0 = time.perf_counter()
    # the abstract mesh only: a concrete one would make the splash kernel's constant tables
    # (built with jnp.array at trace time) land on the compile-only devices
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jitted.lower(*args)
    result.lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with quiet_stderr():
            compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
            raise
        result.compile_s = time.perf_counter() - t0
        result.fits = False
        used = _oom_bytes(msg)
        if used:
            result.peak_bytes = used[0]
            result.notes.append(f"compiler HBM limit {used[1] / GiB:.2f} GiB")
        result.detail = " ".join(msg.split())[:600]
        return None
    result.compile_s = time.perf_counter() - t0
    _memory(result, compiled)
    hf = hlo_flops(compiled.as_text())
    result.kernel_calls = hf.custom_calls
    result.unknown_trip_counts = hf.unknown_trip_counts
    result.kernel_flops = attention_flops if hf.custom_calls else 0.0
    result.compiled_flops = hf.flops * result.chips + result.kernel_flops
    result.hbm_access_bytes, result.link_bytes = hf.hbm_bytes, hf.link_bytes
    result.collective_bytes = dict(hf.collective_bytes)
    result.fits = result.peak_bytes <= result.hbm_bytes
    return compiled


# -- train ----------------------------------------------------------------------------------------


def train_model_config(cfg):
    """The TrainConfig's model; when its ``init_from`` is not on this machine (an 8B recipe compiled
    before the checkpoint was converted), the mufun-8b preset with the config's model overrides."""
    return cfg.model if cfg.model is not None else resolve_model("mufun-8b", cfg.model_overrides)


def compile_train(cfg, topology: str | Topology, *, num_slices: int = 1, attention_impl: str | None = None,
                  model_cfg=None, keep=None, text_only: bool = False) -> AotResult:
    """AOT-compile ``Trainer.train_step`` for ``cfg`` (a :class:`TrainConfig`) on a TPU topology.

    The state comes from ``Trainer.abstract_state()`` and the batch is abstract
    ``(grad_accum, rows, ...)`` arrays with ``Trainer.batch_sharding``: nothing is allocated.
    ``attention_impl`` overrides the config's run setting (its ``auto`` is splash on TPU).
    ``keep`` (a dict) receives the compiled executable under ``"compiled"``. ``text_only`` compiles
    a batch without audio (the LLM alone; ``data.max_chunks`` is ignored)."""
    # jax, and our modules that import it, only here: the CLIs set JAX_PLATFORMS first (read on import)
    import jax
    import jax.numpy as jnp

    from mufun_jax.train_lib import Trainer

    topo = topology if isinstance(topology, Topology) else get_topology(topology, num_slices)
    model_cfg = model_cfg or train_model_config(cfg)
    run = cfg.run if attention_impl is None else cfg.run.replace(attention_impl=attention_impl)
    mesh = topology_mesh(topo, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    d, a = cfg.data, cfg.optim.grad_accum
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    d.check_split(split, f"mesh data x fsdp = {split} on {topo.name}"
                         f"{' x ' + str(topo.num_slices) + ' slices' if topo.num_slices > 1 else ''}")
    trainer = Trainer(cfg, model_cfg, mesh, run)
    state = trainer.abstract_state()
    sh = trainer.batch_sharding
    rows = {k: jax.ShapeDtypeStruct((a, d.batch_size, d.seq_len), jnp.int32, sharding=sh)
            for k in ("input_ids", "labels", "audio_slots", "positions", "segment_ids")}
    batch = {**rows, "waves": jax.ShapeDtypeStruct((a, d.max_chunks, audio.CHUNK_SAMPLES), jnp.float32, sharding=sh),
             "chunk_mask": jax.ShapeDtypeStruct((a, d.max_chunks), jnp.bool_, sharding=sh)}
    chunks = 0 if text_only else d.max_chunks
    if text_only:
        batch = {k: v for k, v in batch.items() if k not in ("waves", "chunk_mask", "audio_slots")}
    result = AotResult("train", topo.name, topo.num_slices, topo.chips, dict(mesh.shape), topo.hbm_bytes, False)
    result.tokens = a * d.batch_size * d.seq_len
    seq_lens = [d.seq_len] * d.batch_size
    result.model_flops = a * flops.train_flops(model_cfg, cfg.trainable, chunks, seq_lens)
    result.detail = (f"rows {d.batch_size} x seq {d.seq_len} x accum {a} (global batch {d.batch_size * a}), "
                     f"{'text only' if text_only else f'{chunks} chunks/micro-batch'}; trainable {cfg.trainable}; "
                     f"remat {run.remat_policy}; "
                     f"attention {run.attention_impl}; loss_chunk {cfg.loss_chunk}; "
                     f"{run.dtype} compute, {run.param_dtype} params")
    kernel = run.attention_impl in ("auto", "splash", "pallas_tpu")  # auto is splash on TPU
    attn = a * _kernel_attention_flops(model_cfg, cfg.trainable, run.remat_policy, chunks, seq_lens) \
        if kernel else 0.0
    compiled = compile_step(result, trainer.train_step, (state, batch), mesh, attention_flops=attn)
    if kernel and compiled is not None:
        result.notes.append("splash attention FLOPs (inside Pallas kernels) added from the model count, "
                            "with remat recomputation of the forward where the policy recomputes it")
    if keep is not None:
        keep["compiled"] = compiled
    return result


def _kernel_attention_flops(model_cfg, trainable, remat_policy: str, chunks: int, seq_lens) -> float:
    """Attention FLOPs done inside kernels in one micro-batch: forward + backward (2x) where
    gradients flow, plus a recomputed forward under remat."""
    p = flops.forward_flops(model_cfg, chunks, seq_lens)
    mult = flops.pass_multipliers(trainable)
    remat = remat_policy != "none"
    total = 0.0
    for m, f in (("whisper", p["enc_a"]), ("llm", p["llm_a"])):
        k = mult[m][1]
        total += f * (k + (1 if remat and k > 1 else 0))
    return total


# -- inference --------------------------------------------------------------------------------------


def compile_infer(topology: str | Topology, *, batch: int, context: int, new_tokens: int = 512,
                  chunks_per_row: int | None = None, mesh_shape: Sequence[int] = (1, 1, -1), num_slices: int = 1,
                  model_cfg=None, prefill_chunk: int | None = None, prefill_batch: int = 4,
                  suffix_len: int = 64, decode_steps: int = 16, quantize: str | None = None,
                  keep: dict | None = None) -> list[AotResult]:
    """AOT-compile the engine's own programs: the jitted functions of a
    :class:`mufun_jax.engine.Generator` built on the abstract model, the same Python functions a run
    calls, with a run's largest shapes. ``batch`` decode slots over a KV cache of ``context +
    new_tokens`` positions, bf16 weights (or ``quantize``: int8 | nf4) and cache, on a (data, fsdp,
    tensor) mesh (default: tensor parallel over every chip of a slice), the cache sharded as the
    engine creates it:

    - ``encode``: the audio of one admission, ``prefill_batch`` x ``chunks_per_row`` 30 s chunks
      (default: half the context's tokens), through Whisper and the connector;
    - ``prefix``: the keys/values of ``prefill_batch`` prompt prefixes of ``context`` tokens;
    - ``prefill``: those prefixes placed into slots, ``suffix_len`` question tokens prefilled on
      top, the first token chosen (the big cache donated);
    - ``decode``: every slot advanced up to ``decode_steps`` tokens at the widest span (the cache
      donated).

    ``keep`` (a dict) receives the generator as ``keep["generator"]``."""
    # jax, and our modules that import it, only here: the CLIs set JAX_PLATFORMS first (read on import)
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    from mufun_jax.engine import Generator
    from mufun_jax.loading import abstract_model, abstract_params
    from mufun_jax.sampling import SamplingParams
    from mufun_jax.models.qwen3 import KVCache

    topo = topology if isinstance(topology, Topology) else get_topology(topology, num_slices)
    model_cfg = model_cfg or preset("mufun-8b")
    mesh = topology_mesh(topo, *mesh_shape)
    tpc = model_cfg.tokens_per_chunk
    chunks_per_row = (context // tpc // 2) if chunks_per_row is None else chunks_per_row
    if chunks_per_row * tpc > context:
        raise ValueError(f"{chunks_per_row} chunks x {tpc} tokens do not fit a context of {context}")
    p = prefill_batch
    abstract = abstract_model(model_cfg, RunSettings(dtype="bfloat16", param_dtype="bfloat16", quantize=quantize))
    with _quiet_logging():
        state = abstract_params(abstract, mesh)
    n_chunks = max(p * chunks_per_row, 1)
    gen = Generator(abstract, max_new_tokens=new_tokens, batch_size=batch, buckets=(context,), prefill_batch=p,
                    prefill_chunk=prefill_chunk, decode_steps=decode_steps, max_chunks=max(chunks_per_row, 1),
                    chunk_buckets=(n_chunks,), mesh=mesh, compile_cache=False)
    if keep is not None:
        keep["generator"] = gen
    on = lambda spec: NamedSharding(mesh, spec)
    rep = lambda shape, dt=jnp.int32: jax.ShapeDtypeStruct(shape, dt, sharding=on(PartitionSpec()))
    cache_sh = on(gen.cache_spec if gen.cache_spec is not None else PartitionSpec())
    q = model_cfg.qwen3
    kv = lambda n, length, sh: jax.ShapeDtypeStruct((q.num_hidden_layers, n, q.num_key_value_heads, length,
                                                      q.head_dim), jnp.bfloat16, sharding=sh)
    big = kv(batch, gen.max_len, cache_sh)
    kv_heads = PartitionSpec(None, None, "tensor" if gen.mesh is not None else None)
    waves = rep((n_chunks, audio.CHUNK_SAMPLES), jnp.float32)
    emb = jax.eval_shape(gen._encode, state, waves)
    emb = rep(emb.shape, emb.dtype)
    rows = lambda n: jax.tree.map(lambda x: rep(x.shape, x.dtype), SamplingParams.rows([SamplingParams()] * n))
    steps = [
        ("encode", gen._encode, (state, waves), {}),
        ("prefix", gen._prefix, (state, rep((p, context)), rep((p, context)), emb), {}),
        ("prefill", gen._prefill, (state, KVCache(big, big), rep((p,)), KVCache(kv(p, context, on(kv_heads)),
                                                                               kv(p, context, on(kv_heads))),
                                   rep((p,)), rep((p, suffix_len)), rep((p,)), rows(p)), {}),
        ("decode", gen._decode, (state, KVCache(big, big), rep((batch,)), rep((batch,)), rep((batch,), jnp.bool_),
                                 rep((batch,)), rep((batch,)), rows(batch)), {"span": gen.max_len}),
    ]
    out = []
    for step, jitted, args, kw in steps:
        r = AotResult(step, topo.name, topo.num_slices, topo.chips, dict(mesh.shape), topo.hbm_bytes, False)
        r.program = jitted
        if step == "encode":
            r.tokens = n_chunks * tpc
            f = flops.forward_flops(model_cfg, n_chunks, [])
            r.model_flops = f["enc_w"] + f["enc_a"] + f["conn_w"]
        elif step == "prefix":
            r.tokens = p * context
            r.model_flops = flops.prefill_flops(model_cfg, p * chunks_per_row, [context] * p)
        elif step == "prefill":
            r.tokens = p * suffix_len
            r.model_flops = sum(flops.forward_flops(model_cfg, 0, [suffix_len] * p, head_positions=p).values())
        else:
            r.tokens = batch * decode_steps
            r.model_flops = decode_steps * flops.decode_flops(model_cfg, batch, gen.max_len)
        r.detail = (f"{batch} slots x {gen.max_len} cache positions (context {context} + {new_tokens} new), "
                    f"{quantize or 'bf16'} weights, bf16 cache; admission batch {p} (prefix {context} tokens with "
                    f"{chunks_per_row} audio chunks, suffix {suffix_len}), {decode_steps} decode steps per call"
                    + (f", prefill_chunk {prefill_chunk}" if prefill_chunk else ""))
        compile_step(r, _lower_with(jitted, kw) if kw else jitted, args, mesh)
        out.append(r)
    return out


class _lower_with:
    """``jitted.lower(*args, **kw)`` behind the one-argument-list ``lower`` compile_step calls."""

    def __init__(self, jitted, kw):
        self.jitted, self.kw = jitted, kw

    def lower(self, *args):
        return self.jitted.lower(*args, **self.kw)


@contextlib.contextmanager
def _quiet_logging():
    lg = logging.getLogger("mufun_jax.sharding")
    old = lg.level
    lg.setLevel(logging.ERROR)  # "not divisible: replicated" for every Whisper head split
    try:
        yield
    finally:
        lg.setLevel(old)


# -- report ---------------------------------------------------------------------------------------


def format_table(results: Sequence[AotResult]) -> str:
    gib = lambda b: f"{b / GiB:.2f}"
    head = ("step", "topology", "mesh d/f/t", "args GiB", "out GiB", "alias GiB", "temp GiB", "peak GiB",
            "usable GiB",
            "free", "fits", "compiled TFLOP", "model TFLOP", "ratio", "compile s")
    rows = []
    for r in results:
        topo = r.topology + (f" x{r.num_slices}" if r.num_slices > 1 else "")
        mesh = "/".join(str(r.mesh.get(k, 1)) for k in ("data", "fsdp", "tensor"))
        rows.append((r.step, topo, mesh, gib(r.argument_bytes), gib(r.output_bytes), gib(r.alias_bytes),
                     gib(r.temp_bytes), gib(r.peak_bytes), f"{r.hbm_bytes / GiB:.2f}",
                     f"{100 * r.hbm_free:.0f}%", "yes" if r.fits else "NO",
                     f"{r.compiled_flops / 1e12:,.1f}" if r.compiled_flops else "-",
                     f"{r.model_flops / 1e12:,.1f}", f"{r.flops_ratio:.2f}" if r.compiled_flops else "-",
                     f"{r.lower_s + r.compile_s:.0f}"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))
    out = [line(head), line("-" * w for w in widths)] + [line(r) for r in rows]
    for r in results:
        out.append(f"{r.step} on {r.topology}: {r.detail}")
        for n in r.notes:
            out.append(f"    note: {n}")
        if r.unknown_trip_counts:
            out.append(f"    note: {r.unknown_trip_counts} while loop(s) of unknown trip count counted once")
    return "\n".join(out)


def not_fitting(results: Sequence[AotResult]) -> str | None:
    bad = [r for r in results if not r.fits]
    if not bad:
        return None
    return "; ".join(f"{r.step} does not fit {r.topology}: needs {r.peak_bytes / GiB:.2f} GiB per chip of "
                     f"{r.hbm_bytes / GiB:.2f} GiB usable HBM. Lower data.batch_size (raise optim.grad_accum to keep "
                     f"the global batch), use remat_policy=full or offload, set loss_chunk, or use a larger slice"
                     for r in bad)


def report(results: Sequence[AotResult], prog: str) -> int:
    """Print the table; 0 if every step fits, 1 (with the reason on stderr) if not."""
    print(format_table(results))
    msg = not_fitting(results)
    if msg:
        print(f"{prog}: {msg}", file=sys.stderr)
        return 1
    return 0


def train_compile_only(cfg, topology: str, num_slices: int = 1, attention_impl: str | None = None) -> int:
    """``train.py --compile-only``: compile, print the table; 0 if it fits, 1 if not."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    try:
        r = compile_train(cfg, topology, num_slices=num_slices, attention_impl=attention_impl)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return report([r], "train.py")


def infer_compile_only(topology: str, *, batch: int, context: int = 4096, new_tokens: int = 512,
                       model: str | None = None, num_slices: int = 1, mesh_shape: Sequence[int] = (1, 1, -1),
                       prefill_chunk: int | None = None, prefill_batch: int = 4, quantize: str | None = None) -> int:
    """``infer.py --compile-only --topology NAME``: compile the prefill and a decode step of the
    model in ``model`` (a converted directory; the mufun-8b preset when it is None or not on this
    machine), print the table; 0 if both fit, 1 if not."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    try:
        model_cfg = None
        if model is not None and has_model(model):
            model_cfg = load_config(model)
        elif model is not None:
            print(f"{model} is not on this machine: compiling the mufun-8b preset", file=sys.stderr)
        results = compile_infer(topology, batch=batch, context=context, new_tokens=new_tokens, mesh_shape=mesh_shape,
                                num_slices=num_slices, model_cfg=model_cfg, prefill_chunk=prefill_chunk,
                                prefill_batch=prefill_batch, quantize=quantize)
    except (ValueError, FileNotFoundError, RuntimeError, CheckpointError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    return report(results, "infer.py")
