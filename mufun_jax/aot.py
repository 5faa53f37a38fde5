"""Ahead-of-time compilation of MuFun's train, prefill and decode steps for TPU topologies.

On any host with ``libtpu`` installed (``pip install -e '.[tpu]'``; no TPU needed), JAX can
describe a TPU pod slice (``jax.experimental.topologies.get_topology_desc``) and compile for it:
the devices are "compile only". Everything here is abstract (``ShapeDtypeStruct``s with
shardings), so nothing is allocated. The compiled executables tell, per chip:

- memory (``compiled.memory_analysis()``): arguments (state + batch), outputs, aliased bytes (the
  donated state), temporaries; peak = arguments + outputs - aliased + temporaries + code;
- FLOPs: ``cost_analysis()`` counts a ``while`` body once, so the matmul FLOPs are read from the
  optimised HLO with the loop trip counts multiplied out (:func:`hlo_flops`), and compared with the
  model FLOPs (:func:`train_model_flops`).

If the step does not fit, the TPU compiler refuses it (``RESOURCE_EXHAUSTED ... hbm``); that is
reported as ``fits=False`` with the compiler's numbers, and the CLI exits with status 1.

CLI::

    python -m mufun_jax.aot train --config configs/mufun8b_full.yaml --topology v5p-128 [KEY=VALUE ...]
    python -m mufun_jax.aot infer --topology v6e-8 --batch 32 --context 4096 --new_tokens 512
    python -m mufun_jax.aot topologies

``train.py --compile_only --topology NAME [--num_slices N]`` calls :func:`compile_train` too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

GiB = 1024**3


# -- topologies ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """One TPU generation, per chip. ``hbm_gib`` and ``bf16_tflops`` are the Cloud TPU system
    architecture pages' figures (cloud.google.com/tpu/docs/v5p, /v6e, /v5e): v5p 95 GB HBM2e and
    459 bf16 TFLOP/s; v6e (Trillium) 32 GB and 918; v5e 16 GB and 197. ``usable_gib`` is what
    libtpu's compiler lets a program use (its out-of-memory message quotes it: 95.74, 31.25 and
    15.75 GiB with libtpu 0.0.42); fitting is judged against it."""

    kind: str  # the prefix of a topology name in get_topology_desc: "v5", "v6e", "v5e"
    chip_config: str  # "megacore" (v5p: the two TensorCores of a chip are one device) or "default"
    hbm_gib: float
    usable_gib: float
    bf16_tflops: float
    chips_per_host: tuple[int, int, int]


TPU_SPECS = {
    "v5p": TpuSpec("v5", "megacore", 95.0, 95.74, 459.0, (2, 2, 1)),
    "v6e": TpuSpec("v6e", "default", 32.0, 31.25, 918.0, (2, 2, 1)),
    "v5e": TpuSpec("v5e", "default", 16.0, 15.75, 197.0, (2, 2, 1)),
}

# Cloud TPU slice names -> (generation, physical topology). v5p slices are named by TensorCores
# (2 per chip), v5e/v6e by chips.
TOPOLOGIES = {
    "v5p-8": ("v5p", "2x2x1"), "v5p-16": ("v5p", "2x2x2"), "v5p-32": ("v5p", "2x2x4"),
    "v5p-64": ("v5p", "2x4x4"), "v5p-128": ("v5p", "4x4x4"), "v5p-256": ("v5p", "4x4x8"),
    "v5p-512": ("v5p", "4x8x8"), "v5p-1024": ("v5p", "8x8x8"),
    "v6e-1": ("v6e", "1x1"), "v6e-4": ("v6e", "2x2"), "v6e-8": ("v6e", "2x4"), "v6e-16": ("v6e", "4x4"),
    "v6e-32": ("v6e", "4x8"), "v6e-64": ("v6e", "8x8"), "v6e-128": ("v6e", "8x16"), "v6e-256": ("v6e", "16x16"),
    "v5e-1": ("v5e", "1x1"), "v5e-4": ("v5e", "2x2"), "v5e-8": ("v5e", "2x4"), "v5e-16": ("v5e", "4x4"),
    "v5e-32": ("v5e", "4x8"), "v5e-64": ("v5e", "8x8"), "v5e-128": ("v5e", "8x16"), "v5e-256": ("v5e", "16x16"),
}


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str  # "v5p-128"
    generation: str  # "v5p"
    topology_name: str  # what get_topology_desc takes: "v5:4x4x4"
    spec: TpuSpec
    num_slices: int
    devices: tuple  # compile-only jax devices, all slices

    @property
    def chips(self) -> int:
        return len(self.devices)

    @property
    def hbm_bytes(self) -> int:
        """What the compiler lets one chip's program use."""
        return int(self.spec.usable_gib * GiB)


def _resolve_topology(name: str) -> tuple[str, str, TpuSpec]:
    """``v5p-128`` (a slice name) or ``v5e:2x2`` / ``v5p:4x4x4`` (generation:physical topology)."""
    if name in TOPOLOGIES:
        gen, phys = TOPOLOGIES[name]
    elif ":" in name and name.split(":")[0] in TPU_SPECS:
        gen, phys = name.split(":", 1)
    else:
        raise ValueError(f"unknown TPU topology {name!r}; use a slice name ({', '.join(TOPOLOGIES)}) or "
                         f"GENERATION:TOPOLOGY with generation in {sorted(TPU_SPECS)} (e.g. v5e:2x2)")
    spec = TPU_SPECS[gen]
    dims = [int(x) for x in phys.split("x")]
    host = tuple(min(h, d) for h, d in zip(spec.chips_per_host, dims + [1] * (3 - len(dims))))
    spec = dataclasses.replace(spec, chips_per_host=host)
    return gen, f"{spec.kind}:{phys}", spec


def _libtpu_env() -> None:
    # A CPU process with libtpu installed takes /tmp/libtpu_lockfile at start-up; compiling for
    # a topology does not need exclusive use of a (non-existent) TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


@contextlib.contextmanager
def _quiet_stderr():
    """libtpu prints start-up warnings about a missing TPU VM environment on fd 2; hide them unless
    the call fails."""
    fd = 2  # libtpu writes to the process's fd 2, whatever sys.stderr is
    try:
        saved = os.dup(fd)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        os.dup2(tmp.fileno(), fd)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            if not ok:
                tmp.seek(0)
                sys.stderr.write(tmp.read().decode(errors="replace")[-4000:])


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """Compile-only devices of a TPU slice (``num_slices`` > 1: a multi-slice job over DCN)."""
    _libtpu_env()
    import jax
    from jax.experimental import topologies

    gen, topo_name, spec = _resolve_topology(name)
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    try:
        with _quiet_stderr():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo_name,
                                                chip_config_name=spec.chip_config,
                                                chips_per_host_bounds=spec.chips_per_host, num_slices=num_slices)
    except (ImportError, RuntimeError, jax.errors.JaxRuntimeError) as e:
        if "libtpu" in str(e).lower() or "plugin" in str(e).lower() or isinstance(e, ImportError):
            raise RuntimeError(f"cannot describe TPU topology {topo_name}: {e}. Compiling for TPU on this host "
                               f"needs libtpu: pip install -e '.[tpu]' (or pip install 'jax[tpu]')") from e
        raise
    return Topology(name, gen, topo_name, spec, num_slices, tuple(desc.devices))


def topology_mesh(topo: Topology, data: int = 1, fsdp: int = -1, tensor: int = 1):
    """A (data, fsdp, tensor) mesh over the topology, laid out along the physical torus
    (``mesh_utils``). With several slices, ``data`` is split further over the slices (DCN): the
    mesh has ``num_slices * data`` data replicas and fsdp/tensor stay within a slice."""
    import numpy as np
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from mufun_jax.sharding import MESH_AXES

    per_slice = topo.chips // topo.num_slices
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: at most one size may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if per_slice % known:
            raise ValueError(f"{per_slice} chips per slice cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = per_slice // known
    if math.prod(sizes) != per_slice:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} chips per slice; "
                         f"{topo.name} has {per_slice}")
    if topo.num_slices == 1:
        devices = mesh_utils.create_device_mesh(sizes, list(topo.devices))
    else:
        devices = mesh_utils.create_hybrid_device_mesh(sizes, [topo.num_slices, 1, 1], list(topo.devices))
    return Mesh(np.asarray(devices), MESH_AXES)


# -- FLOPs from the optimised HLO -------------------------------------------------------------------

_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_SHAPE = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)")
_LISTS = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_COMBINERS = {"reduce", "reduce-window", "all-reduce", "all-reduce-start", "reduce-scatter", "scatter", "sort",
              "map", "select-and-scatter"}  # their computations are scalar combiners


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    opcode: str
    operands: list
    attrs: str


@dataclasses.dataclass
class HloFlops:
    flops: float  # matmul FLOPs per device, while loops multiplied by their trip counts
    custom_calls: int  # Pallas kernel (tpu_custom_call) sites: their FLOPs are not in ``flops``
    unknown_trip_counts: int  # while loops whose trip count could not be read (counted once)


def _dims(type_str: str) -> list[int]:
    m = _SHAPE.search(type_str)
    return [int(x) for x in m.group(2).split(",") if x] if m else []


def _close(s: str, start: int) -> int:
    depth = 0
    for i in range(start, len(s)):
        depth += s[i] in "([{"
        depth -= s[i] in ")]}"
        if depth == 0:
            return i
    return len(s) - 1


def _split_top(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + ([cur.strip()] if cur.strip() else [])


def _parse_instr(line: str) -> _Instr | None:
    line = line.strip()
    line = line[5:] if line.startswith("ROOT ") else line
    if not line.startswith("%") or " = " not in line:
        return None
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):
        end = _close(rest, 0)
        type_str, rest = rest[:end + 1], rest[end + 1:].lstrip()
    else:
        type_str, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    end = _close(rest, m.end() - 1)
    operands = [o.split()[-1].lstrip("%") for o in _split_top(rest[m.end():end])]
    return _Instr(name.lstrip("%"), type_str, m.group(1), operands, rest[end + 1:])


def _parse_module(text: str) -> tuple[dict[str, list[_Instr]], str | None]:
    comps: dict[str, list[_Instr]] = {}
    entry = cur = None
    for line in text.splitlines():
        if cur is None:
            m = _HEADER.match(line)
            if m:
                cur = m.group(1)
                comps[cur] = []
                entry = cur if line.startswith("ENTRY") else entry
        elif line.strip() == "}":
            cur = None
        else:
            ins = _parse_instr(line)
            if ins is not None:
                comps[cur].append(ins)
    return comps, entry


def _window(attrs: str, n: int) -> dict[str, list]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in m.group(1).split()) if m else {}
    get = lambda k, default: fields[k].split("x") if k in fields else [default] * n
    return {"size": [int(x) for x in get("size", "1")], "stride": [int(x) for x in get("stride", "1")],
            "pad_lo": [int(p.split("_")[0]) for p in get("pad", "0_0")],
            "lhs_dilate": [int(x) for x in get("lhs_dilate", "1")],
            "rhs_dilate": [int(x) for x in get("rhs_dilate", "1")]}


def _taps(n_in: int, n_out: int, size: int, stride: int, pad_lo: int, lhs_dilate: int, rhs_dilate: int) -> int:
    """(output position, window tap) pairs of one spatial dimension that read a real input element,
    not padding or a hole of lhs dilation (TPU XLA writes batched matmuls as such convolutions)."""
    import numpy as np

    pos = np.arange(n_out)[:, None] * stride + np.arange(size)[None, :] * rhs_dilate - pad_lo
    return int(((pos >= 0) & (pos <= (n_in - 1) * lhs_dilate) & (pos % lhs_dilate == 0)).sum())


def _conv_flops(ins: _Instr, shapes: dict) -> float:
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    if not m or len(ins.operands) < 2:
        return 0.0
    lhs_l, rhs_l, out_l = m.groups()
    lhs, rhs, out = _dims(shapes.get(ins.operands[0], "")), _dims(shapes.get(ins.operands[1], "")), _dims(ins.type)
    if (len(lhs), len(rhs), len(out)) != (len(lhs_l), len(rhs_l), len(out_l)):
        return 0.0
    spatial = sorted(c for c in rhs_l if c.isdigit())
    w = _window(ins.attrs, len(spatial))
    taps = math.prod(_taps(lhs[lhs_l.index(c)], out[out_l.index(c)], w["size"][j], w["stride"][j], w["pad_lo"][j],
                           w["lhs_dilate"][j], w["rhs_dilate"][j]) for j, c in enumerate(spatial))
    return 2.0 * out[out_l.index("b")] * out[out_l.index("f")] * taps * rhs[rhs_l.index("i")]


def _dot_flops(ins: _Instr, shapes: dict) -> float:
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    lhs = _dims(shapes.get(ins.operands[0], "")) if ins.operands else []
    contract = math.prod(lhs[int(i)] for i in m.group(1).split(",") if i) if m and lhs else 1
    return 2.0 * math.prod(_dims(ins.type)) * contract


def _int_constant(ins: _Instr | None) -> int | None:
    m = re.match(r"-?\d+$", ins.operands[0]) if ins is not None and ins.opcode == "constant" and ins.operands else None
    return int(m.group(0)) if m else None


def _trip_count(ins: _Instr, comps: dict, local: dict) -> int | None:
    """``known_trip_count`` if XLA recorded it, else ``limit - start`` of an ``i < limit`` loop."""
    m = re.search(r'"known_trip_count":\{"n":"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    m = re.search(r"condition=%?([\w.\-]+)", ins.attrs)
    body = comps.get(m.group(1), []) if m else []
    if not body or body[-1].opcode != "compare":
        return None
    cond = {i.name: i for i in body}
    d = re.search(r"direction=(\w+)", body[-1].attrs)
    a, b = (cond.get(o) for o in body[-1].operands[:2])
    direction = d.group(1) if d else None
    if _int_constant(a) is not None:
        a, b, direction = b, a, {"GT": "LT", "GE": "LE"}.get(direction)
    limit = _int_constant(b)
    idx = re.search(r"index=(\d+)", a.attrs) if a is not None and a.opcode == "get-tuple-element" else None
    if limit is None or idx is None or direction not in ("LT", "LE"):
        return None
    start = 0
    t = local.get(ins.operands[0]) if ins.operands else None
    if t is not None and t.opcode == "tuple" and int(idx.group(1)) < len(t.operands):
        x = local.get(t.operands[int(idx.group(1))])
        while x is not None and x.opcode == "copy" and x.operands:
            x = local.get(x.operands[0])
        start = _int_constant(x) or 0
    return max(limit - start + (direction == "LE"), 0)


def hlo_flops(hlo_text: str) -> HloFlops:
    """Matmul (dot + convolution) FLOPs per device of an optimised, SPMD-partitioned HLO module,
    following fusions and calls, with each ``while`` body times its trip count and the most
    expensive branch of each conditional. Elementwise work is not counted; custom calls (Pallas
    kernels) are counted as sites only."""
    comps, entry = _parse_module(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    memo: dict[str, tuple[float, int, int]] = {}

    def visit(comp: str) -> tuple[float, int, int]:
        if comp in memo:
            return memo[comp]
        memo[comp] = (0.0, 0, 0)
        local = {i.name: i for i in comps.get(comp, [])}
        shapes = {k: i.type for k, i in local.items()}
        flops, calls, unknown = 0.0, 0, 0

        def add(r, n=1):
            nonlocal flops, calls, unknown
            flops, calls, unknown = flops + n * r[0], calls + r[1], unknown + r[2]

        for ins in comps.get(comp, []):
            if ins.opcode == "convolution":
                flops += _conv_flops(ins, shapes)
            elif ins.opcode == "dot":
                flops += _dot_flops(ins, shapes)
            elif ins.opcode == "custom-call" and "tpu_custom_call" in ins.attrs:
                calls += 1  # a Pallas (Mosaic) kernel
            if ins.opcode == "while":
                n = _trip_count(ins, comps, local)
                unknown += n is None
                for key in ("body", "condition"):
                    m = re.search(rf"\b{key}=%?([\w.\-]+)", ins.attrs)
                    if m:
                        add(visit(m.group(1)), 1 if n is None else n)
                continue
            if ins.opcode in _COMBINERS:
                continue
            called = [m.group(2) for m in _CALLS.finditer(ins.attrs)]
            for m in _LISTS.finditer(ins.attrs):
                called += [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
            if ins.opcode == "conditional":
                add(max((visit(c) for c in called), key=lambda r: r[0], default=(0.0, 0, 0)))
            else:
                for c in called:
                    add(visit(c))
        memo[comp] = (flops, calls, unknown)
        return memo[comp]

    return HloFlops(*visit(entry))


# -- model FLOPs ------------------------------------------------------------------------------------


def _kernel_sizes(model_cfg) -> dict[str, float]:
    """Matmul weight counts: per Whisper layer, connector, per Qwen3 layer, LM head; and the convs."""
    w, q = model_cfg.whisper, model_cfg.qwen3
    d, f = w.d_model, w.encoder_ffn_dim
    c = model_cfg.connector
    conn = c.in_dim * c.out_dim if c.hidden_dim is None else c.in_dim * c.hidden_dim + c.hidden_dim * c.out_dim
    h, hd = q.hidden_size, q.head_dim
    llm_layer = h * hd * (2 * q.num_attention_heads + 2 * q.num_key_value_heads) + 3 * h * q.intermediate_size
    return {"whisper_layer": 4 * d * d + 2 * d * f, "conv1": 3 * w.num_mel_bins * d, "conv2": 3 * d * d,
            "connector": conn, "llm_layer": llm_layer, "lm_head": h * q.vocab_size}


def _pass_multipliers(trainable: dict[str, str]) -> dict[str, tuple[int, int]]:
    """(weight-matmul, attention) FLOP multipliers of each module's forward pass: 1 forward only;
    + 1 (weights) / + 2 (attention) for the gradient w.r.t. its input when something upstream
    trains or it trains itself; + 1 (weights) for its weight gradient when it trains."""
    out, upstream = {}, False
    for m in ("whisper", "connector", "llm"):
        trained = trainable[m] == "full"
        # the gradient w.r.t. a module's input is needed only for a trained module before it
        out[m] = (1 + int(upstream) + int(trained), 1 + 2 * int(upstream or trained))
        upstream = upstream or trained
    return out


def train_model_flops(model_cfg, trainable: dict[str, str], rows: int, seq_len: int, chunks: int) -> float:
    """Model FLOPs of one micro-batch: 2 x weights x tokens per forward pass, times 3 for a trained
    module (forward, input gradient, weight gradient), 2 for a frozen module that gradients pass
    through (the LLM when only the connector trains), 1 for a frozen module before every trained
    one; plus attention, 4 x seq^2 x heads x head_dim per layer and sequence forward (the causal
    square counted whole, as in the PaLM MFU formula) and twice that backward. Remat recomputation
    is not model FLOPs: it shows up as a ratio above 1."""
    k = _kernel_sizes(model_cfg)
    w, q = model_cfg.whisper, model_cfg.qwen3
    mult = _pass_multipliers(trainable)
    frames = w.max_source_positions
    n_layers = max(model_cfg.taps) if max(model_cfg.taps) < w.encoder_layers else w.encoder_layers
    whisper_w = 2 * chunks * (2 * frames * k["conv1"] + frames * k["conv2"] + frames * n_layers * k["whisper_layer"])
    whisper_a = 2 * chunks * n_layers * 2 * frames * frames * w.d_model
    conn = 2 * chunks * model_cfg.tokens_per_chunk * k["connector"]
    tokens = rows * seq_len
    llm_w = 2 * tokens * (q.num_hidden_layers * k["llm_layer"] + k["lm_head"])
    llm_a = 2 * rows * q.num_hidden_layers * 2 * seq_len * seq_len * q.num_attention_heads * q.head_dim
    return (mult["whisper"][0] * whisper_w + mult["whisper"][1] * whisper_a + mult["connector"][0] * conn
            + mult["llm"][0] * llm_w + mult["llm"][1] * llm_a)


def infer_model_flops(model_cfg, batch: int, context: int, cache_len: int, chunks: int, phase: str) -> float:
    """Forward FLOPs: prefill = audio encoding of ``chunks`` + ``batch x context`` tokens through the
    decoder (causal square attention) + the LM head at each row's last position; decode = one token
    per row attending to ``cache_len`` slots, LM head included."""
    k = _kernel_sizes(model_cfg)
    w, q = model_cfg.whisper, model_cfg.qwen3
    attn = 4 * q.num_hidden_layers * q.num_attention_heads * q.head_dim
    if phase == "decode":
        return 2 * batch * (q.num_hidden_layers * k["llm_layer"] + k["lm_head"]) + batch * attn * cache_len
    frames = w.max_source_positions
    n_layers = max(model_cfg.taps) if max(model_cfg.taps) < w.encoder_layers else w.encoder_layers
    audio = 2 * chunks * (2 * frames * k["conv1"] + frames * k["conv2"] + frames * n_layers * k["whisper_layer"]
                          + 2 * n_layers * frames * frames * w.d_model + model_cfg.tokens_per_chunk * k["connector"])
    return (audio + 2 * batch * context * q.num_hidden_layers * k["llm_layer"] + 2 * batch * k["lm_head"]
            + batch * attn * context * context)


# -- results --------------------------------------------------------------------------------------


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
    tokens: int = 0  # tokens per step (train: all micro-batches; prefill: batch x context; decode: batch)
    lower_s: float = 0.0
    compile_s: float = 0.0
    detail: str = ""  # configuration summary, or the compiler's out-of-memory message
    notes: list = dataclasses.field(default_factory=list)

    @property
    def hbm_free(self) -> float:
        return 1.0 - self.peak_bytes / self.hbm_bytes

    @property
    def flops_ratio(self) -> float:
        return self.compiled_flops / self.model_flops if self.model_flops else float("nan")

    def step_time_at_peak(self, spec: TpuSpec) -> float:
        return self.compiled_flops / (self.chips * spec.bf16_tflops * 1e12)


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


def _compile(result: AotResult, jitted, args, mesh, *, attention_flops: float = 0.0):
    """Lower + compile under the mesh (so the model's activation constraints and the kernel's
    shard_map see it), then fill in memory and FLOPs. An HBM overflow becomes ``fits=False``."""
    import jax

    t0 = time.perf_counter()
    # the abstract mesh only: a concrete one would make the splash kernel's constant tables
    # (built with jnp.array at trace time) land on the compile-only devices
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jitted.lower(*args)
    result.lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with _quiet_stderr():
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
    result.fits = result.peak_bytes <= result.hbm_bytes
    return compiled


# -- train ----------------------------------------------------------------------------------------


def _model_config_for(cfg, attention_impl: str | None):
    """The TrainConfig's model (its ``init_from`` config when that exists here, else the mufun-8b
    preset with the ``model`` overrides), with the attention backend for the compile."""
    from mufun_jax.config import preset

    base = None
    if cfg.init_from and Path(cfg.init_from, "mufun_config.json").exists():
        from mufun_jax.weights import load_config

        base = load_config(cfg.init_from)
    elif "preset" not in cfg.model:
        base = preset("mufun-8b")
    model_cfg = cfg.model_config(base)
    return model_cfg if attention_impl is None else model_cfg.replace(attention_impl=attention_impl)


def compile_train(cfg, topology: str | Topology, *, num_slices: int = 1, attention_impl: str | None = "splash",
                  model_cfg=None, keep=None) -> AotResult:
    """AOT-compile ``Trainer.train_step`` for ``cfg`` (a :class:`TrainConfig`) on a TPU topology.

    The state comes from ``Trainer.abstract_state()`` and the batch is abstract
    ``(grad_accum, rows, ...)`` arrays with ``Trainer.batch_sharding``: nothing is allocated.
    ``attention_impl`` overrides the model's (None keeps it). ``keep`` (a dict) receives the
    compiled executable under ``"compiled"`` for callers who want to inspect it."""
    import jax
    import jax.numpy as jnp

    from mufun_jax import audio
    from mufun_jax.train_lib import Trainer

    topo = topology if isinstance(topology, Topology) else get_topology(topology, num_slices)
    model_cfg = model_cfg or _model_config_for(cfg, attention_impl)
    mesh = topology_mesh(topo, cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    d, a = cfg.data, cfg.optim.grad_accum
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, v in [("data.batch_size", d.batch_size), ("data.max_chunks", d.max_chunks)]:
        if v % split:
            raise ValueError(f"{name}={v} must be divisible by mesh data x fsdp = {split} on {topo.name}"
                             f"{' x ' + str(topo.num_slices) + ' slices' if topo.num_slices > 1 else ''}")
    trainer = Trainer(cfg, model_cfg, mesh)
    state = trainer.abstract_state()
    sh = trainer.batch_sharding
    rows = {k: jax.ShapeDtypeStruct((a, d.batch_size, d.seq_len), jnp.int32, sharding=sh)
            for k in ("input_ids", "labels", "audio_slots", "positions", "segment_ids")}
    batch = {**rows, "waves": jax.ShapeDtypeStruct((a, d.max_chunks, audio.CHUNK_SAMPLES), jnp.float32, sharding=sh),
             "chunk_mask": jax.ShapeDtypeStruct((a, d.max_chunks), jnp.bool_, sharding=sh)}
    result = AotResult("train", topo.name, topo.num_slices, topo.chips, dict(mesh.shape), topo.hbm_bytes, False)
    result.tokens = a * d.batch_size * d.seq_len
    result.model_flops = a * train_model_flops(model_cfg, cfg.trainable, d.batch_size, d.seq_len, d.max_chunks)
    result.detail = (f"rows {d.batch_size} x seq {d.seq_len} x accum {a} (global batch {d.batch_size * a}), "
                     f"{d.max_chunks} chunks/micro-batch; trainable {cfg.trainable}; remat {model_cfg.remat_policy}; "
                     f"attention {model_cfg.attention_impl}; loss_chunk {cfg.loss_chunk}; "
                     f"{model_cfg.dtype} compute, {model_cfg.param_dtype} params")
    kernel = model_cfg.attention_impl in ("splash", "pallas_tpu")
    attn = (a * _attention_flops_train(model_cfg, cfg.trainable, d.batch_size, d.seq_len, d.max_chunks)
            if kernel else 0.0)
    compiled = _compile(result, trainer.train_step, (state, batch), mesh, attention_flops=attn)
    if kernel and compiled is not None:
        result.notes.append("splash attention FLOPs (inside Pallas kernels) added from the model count, "
                            "with remat recomputation of the forward where the policy recomputes it")
    if keep is not None:
        keep["compiled"] = compiled
    return result


def _attention_flops_train(model_cfg, trainable, rows, seq_len, chunks) -> float:
    """Attention FLOPs a kernel does in one micro-batch: forward + backward (2x) where gradients flow,
    plus a recomputed forward under remat; the causal square counted whole (splash skips the
    masked blocks, so it does about half the causal part)."""
    w, q = model_cfg.whisper, model_cfg.qwen3
    mult = _pass_multipliers(trainable)
    remat = model_cfg.remat_policy not in ("none",)
    n_layers = max(model_cfg.taps) if max(model_cfg.taps) < w.encoder_layers else w.encoder_layers
    wa = 2 * chunks * n_layers * 2 * w.max_source_positions ** 2 * w.d_model
    la = 2 * rows * q.num_hidden_layers * 2 * seq_len * seq_len * q.num_attention_heads * q.head_dim
    total = 0.0
    for m, f in (("whisper", wa), ("llm", la)):
        k = mult[m][1]
        total += f * (k + (1 if remat and k > 1 else 0))
    return total


# -- inference --------------------------------------------------------------------------------------


def _infer_functions(graphdef, max_len: int, prefill_chunk: int | None):
    import jax.numpy as jnp
    from flax import nnx

    from mufun_jax import audio
    from mufun_jax.generate import _embed_prompt, _prefill
    from mufun_jax.models.qwen3 import KVCache

    def prefill(state, input_ids, audio_slots, waves, lengths):
        model = nnx.merge(graphdef, state)
        lm = model.language_model
        mel = None if waves is None else audio.log_mel_spectrogram(waves, model.cfg.whisper.num_mel_bins)
        cache = KVCache.init(lm.cfg, input_ids.shape[0], max_len, dtype=lm.dtype)
        last, cache = _prefill(lm, _embed_prompt(model, input_ids, audio_slots, mel), lengths, cache, prefill_chunk)
        return jnp.argmax(lm.logits(last), axis=-1).astype(jnp.int32), cache

    def decode(state, cache, tokens, positions):
        lm = nnx.merge(graphdef, state).language_model
        logits, cache = lm(inputs_embeds=lm.embed(tokens[:, None]), positions=positions[:, None], cache=cache)
        return jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32), cache

    return prefill, decode


def compile_infer(topology: str | Topology, *, batch: int, context: int, new_tokens: int = 512,
                  chunks_per_row: int | None = None, mesh_shape: Sequence[int] = (1, 1, -1), num_slices: int = 1,
                  model_cfg=None, prefill_chunk: int | None = None) -> list[AotResult]:
    """AOT-compile the prefill (prompt of ``context`` tokens, with ``chunks_per_row`` 30 s audio
    chunks per row, default half the context) and one decode step (cache of ``context + new_tokens``
    slots) of the 8B model with bf16 weights, on a (data, fsdp, tensor) mesh (default: tensor
    parallel over every chip of a slice)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from mufun_jax import audio
    from mufun_jax.config import preset
    from mufun_jax.models import MuFun
    from mufun_jax.models.qwen3 import KVCache
    from mufun_jax.sharding import logical_to_spec
    from mufun_jax.train_lib import param_shardings

    topo = topology if isinstance(topology, Topology) else get_topology(topology, num_slices)
    model_cfg = (model_cfg or preset("mufun-8b")).replace(dtype="bfloat16", param_dtype="bfloat16", remat_policy="none")
    mesh = topology_mesh(topo, *mesh_shape)
    chunks_per_row = (context // model_cfg.tokens_per_chunk // 2) if chunks_per_row is None else chunks_per_row
    if chunks_per_row * model_cfg.tokens_per_chunk > context:
        raise ValueError(f"{chunks_per_row} chunks x {model_cfg.tokens_per_chunk} tokens do not fit a context of "
                         f"{context}")
    chunks = batch * chunks_per_row
    max_len = context + new_tokens
    abstract = nnx.eval_shape(lambda: MuFun(model_cfg, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    with _quiet_logging():
        shardings = param_shardings(abstract, mesh)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         nnx.to_pure_dict(nnx.state(abstract)), shardings)
    prefill, decode = _infer_functions(graphdef, max_len, prefill_chunk)

    def sharded(shape, dtype, axes):
        spec = logical_to_spec(axes, shape=shape, mesh=mesh)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))

    q = model_cfg.qwen3
    cache_shape = (q.num_hidden_layers, batch, max_len, q.num_key_value_heads, q.head_dim)
    with _quiet_logging():
        rows = lambda shape, dt=jnp.int32: sharded(shape, dt, ("batch",) + (None,) * (len(shape) - 1))
        cache_struct = sharded(cache_shape, jnp.bfloat16, ("layers", "batch", None, "kv_heads", "head_dim"))
        prefill_args = (state, rows((batch, context)), rows((batch, context)),
                        rows((chunks, audio.CHUNK_SAMPLES), jnp.float32) if chunks else None, rows((batch,)))
    cache = KVCache(cache_struct, cache_struct)
    cache_sh = KVCache(cache_struct.sharding, cache_struct.sharding)
    tokens = rows((batch,))
    steps = [("prefill", jax.jit(prefill, out_shardings=(tokens.sharding, cache_sh)), prefill_args),
             ("decode", jax.jit(decode, out_shardings=(tokens.sharding, cache_sh), donate_argnums=1),
              (state, cache, tokens, rows((batch,))))]
    out = []
    for step, jitted, args in steps:
        r = AotResult(step, topo.name, topo.num_slices, topo.chips, dict(mesh.shape), topo.hbm_bytes, False)
        r.tokens = batch * context if step == "prefill" else batch
        r.model_flops = infer_model_flops(model_cfg, batch, context, max_len, chunks, step)
        r.detail = (f"batch {batch}, context {context} ({chunks_per_row} audio chunks/row), cache {max_len} slots, "
                    f"bf16 weights and cache" + (f", prefill_chunk {prefill_chunk}" if prefill_chunk else ""))
        _compile(r, jitted, args, mesh)
        out.append(r)
    return out


@contextlib.contextmanager
def _quiet_logging():
    import logging

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


def _not_fitting(results: Sequence[AotResult]) -> str | None:
    bad = [r for r in results if not r.fits]
    if not bad:
        return None
    return "; ".join(f"{r.step} does not fit {r.topology}: needs {r.peak_bytes / GiB:.2f} GiB per chip of "
                     f"{r.hbm_bytes / GiB:.2f} GiB usable HBM. Lower data.batch_size (raise optim.grad_accum to keep "
                     f"the global batch), use model.remat_policy=full or offload, set loss_chunk, or use a larger slice"
                     for r in bad)


def _report(results: Sequence[AotResult], prog: str) -> int:
    """Print the table; 0 if every step fits, 1 (with the reason on stderr) if not."""
    print(format_table(results))
    msg = _not_fitting(results)
    if msg:
        print(f"{prog}: {msg}", file=sys.stderr)
        return 1
    return 0


def train_compile_only(cfg, topology: str, num_slices: int = 1, attention_impl: str | None = "splash") -> int:
    """``train.py --compile_only``: compile, print the table; 0 if it fits, 1 if not."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    try:
        r = compile_train(cfg, topology, num_slices=num_slices, attention_impl=attention_impl)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    return _report([r], "train.py")


def infer_compile_only(topology: str, *, batch: int, context: int = 4096, new_tokens: int = 512,
                       model: str | None = None, num_slices: int = 1, mesh_shape: Sequence[int] = (1, 1, -1),
                       prefill_chunk: int | None = None) -> int:
    """``infer.py --compile_only --topology NAME``: compile the prefill and a decode step of the
    model in ``model`` (a converted directory; the mufun-8b preset when it is None or not on this
    machine), print the table; 0 if both fit, 1 if not."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    from mufun_jax.torch_files import CheckpointError

    try:
        model_cfg = None
        if model is not None and ("://" in str(model) or Path(model, "mufun_config.json").exists()):
            from mufun_jax.weights import load_config

            model_cfg = load_config(model)
        elif model is not None:
            print(f"{model} is not on this machine: compiling the mufun-8b preset", file=sys.stderr)
        results = compile_infer(topology, batch=batch, context=context, new_tokens=new_tokens, mesh_shape=mesh_shape,
                                num_slices=num_slices, model_cfg=model_cfg, prefill_chunk=prefill_chunk)
    except (ValueError, FileNotFoundError, RuntimeError, CheckpointError) as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2
    return _report(results, "infer.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mufun_jax.aot",
                                 description="Compile MuFun steps for a TPU topology on this host (needs libtpu) "
                                             "and report per-chip memory and FLOPs.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the train step of a training config")
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    i = sub.add_parser("infer", help="the prefill and one decode step of batched inference")
    i.add_argument("--batch", type=int, required=True, help="rows per batch")
    i.add_argument("--context", type=int, required=True, help="prompt length (tokens, audio slots included)")
    i.add_argument("--new_tokens", type=int, default=512, help="decode steps the KV cache holds room for")
    i.add_argument("--chunks_per_row", type=int, default=None, help="30 s audio chunks per row (default: half "
                                                                          "the context)")
    i.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor (default: tensor parallel over a slice)")
    i.add_argument("--prefill_chunk", type=int, default=None)
    i.add_argument("--init_from", default=None, help="a converted checkpoint (its mufun_config.json); "
                                                     "default: the mufun-8b preset")
    for p in (t, i):
        p.add_argument("--topology", required=True, help="v5p-128, v6e-64, v5e-256, ... or e.g. v5e:2x2")
        p.add_argument("--num_slices", type=int, default=1)
        p.add_argument("--json", default=None, help="also write the results to this JSON file")
    t.add_argument("--attention_impl", default="splash", help="model attention backend for the compile "
                                                              "(default splash; 'keep' uses the config's)")
    sub.add_parser("topologies", help="list the known slice names")
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compiling only: never take a local TPU
    if args.cmd == "topologies":
        for name, (gen, phys) in TOPOLOGIES.items():
            s = TPU_SPECS[gen]
            print(f"{name:10s} {s.kind}:{phys:8s} {s.hbm_gib:.0f} GB HBM/chip ({s.usable_gib} GiB usable), "
                  f"{s.bf16_tflops:.0f} bf16 TFLOP/s/chip")
        return 0
    try:
        if args.cmd == "train":
            from mufun_jax.train_config import TrainConfig

            cfg = TrainConfig.load(args.config, args.overrides)
            impl = None if args.attention_impl == "keep" else args.attention_impl
            results = [compile_train(cfg, args.topology, num_slices=args.num_slices, attention_impl=impl)]
        else:
            model_cfg = None
            if args.init_from:
                from mufun_jax.weights import load_config

                model_cfg = load_config(args.init_from)
            mesh = tuple(int(x) for x in args.mesh.split(","))
            results = compile_infer(args.topology, batch=args.batch, context=args.context,
                                    new_tokens=args.new_tokens, chunks_per_row=args.chunks_per_row, mesh_shape=mesh,
                                    num_slices=args.num_slices, model_cfg=model_cfg,
                                    prefill_chunk=args.prefill_chunk)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"aot: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        import json

        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return _report(results, "aot")


if __name__ == "__main__":
    sys.exit(main())
