"""Matmul FLOPs, HBM traffic and collective bytes of an optimised, SPMD-partitioned HLO module,
with loops multiplied out.

``compiled.cost_analysis()`` counts a ``while`` body once, which for scanned layers undercounts by
the layer count; this counter reads the HLO text, follows fusions and calls, and multiplies each
loop body by its trip count. The byte counts are a roofline model, not a simulation: each
top-level instruction (a fusion counts as one) reads its operands from HBM and writes its result,
except that a slice of a larger buffer reads only the slice and an in-place update writes only the
update; collectives are counted separately, by the bytes each device sends over a ring.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

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
    hbm_bytes: float = 0.0  # bytes read + written by top-level instructions, per device
    collective_bytes: dict = dataclasses.field(default_factory=dict)  # kind -> payload bytes per device
    link_bytes: float = 0.0  # bytes each device sends over ICI for those collectives (ring algorithms)


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 0.5, "u4": 0.5}
_NO_TRAFFIC = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "while", "conditional", "call",
               "after-all", "partition-id", "replica-id", "opt-barrier", "async-start", "async-update", "async-done",
               "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done", "send-done",
               "recv-done", "add-dependency", "domain"}
_COLLECTIVES = {"all-gather": "all-gather", "all-gather-start": "all-gather", "reduce-scatter": "reduce-scatter",
                "all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
                "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
                "collective-permute-start": "collective-permute"}


_SHAPE_LAYOUT = re.compile(r"([a-z]+[0-9]*)\[([0-9,]*)\](\{[^}]*\})?")


def _bytes(type_str: str, hbm_only: bool = True) -> float:
    """HBM bytes of a shape or of every shape in a tuple type (f8 types: 1 byte); buffers that TPU
    XLA placed in on-chip VMEM (layout memory space ``S(1)``) are not HBM traffic."""
    total = 0.0
    for m in _SHAPE_LAYOUT.finditer(type_str):
        if hbm_only and m.group(3) and "S(1)" in m.group(3):
            continue
        dt = m.group(1)
        size = _BYTES.get(dt, 1 if dt.startswith("f8") else 4)
        total += size * math.prod(int(x) for x in m.group(2).split(",") if x)
    return total


def _group_size(attrs: str, devices: int) -> int:
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attrs)  # iota form: [groups, size]<=[devices]
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)  # mesh['a'=4,'b'=16] {'b'}
    if m:
        sizes = {k.strip(" '\""): int(v) for k, v in (x.split("=") for x in m.group(1).split(",") if "=" in x)}
        return max(math.prod(sizes.get(a.strip(" '\""), 1) for a in m.group(2).split(",") if a.strip()), 1)
    m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
    if m:
        return max(len([x for x in m.group(1).split(",") if x]), 1)
    if "source_target_pairs" in attrs:
        return 2
    return max(devices, 1)


def _collective(ins: _Instr, shapes: dict, devices: int) -> tuple[str, float, float]:
    """(kind, payload bytes per device, bytes each device sends in a ring algorithm)."""
    kind = _COLLECTIVES[ins.opcode]
    payload = sum(_bytes(shapes.get(o, ""), hbm_only=False) for o in ins.operands)
    n = _group_size(ins.attrs, devices)
    sent = {"all-gather": payload * (n - 1), "reduce-scatter": payload * (n - 1) / n,
            "all-reduce": 2 * payload * (n - 1) / n, "all-to-all": payload * (n - 1) / n,
            "collective-permute": payload}[kind]
    return kind, payload * (n if kind == "all-gather" else 1), sent


def _param_read(comps: dict, fused: list, idx: int, full: float, depth: int = 0) -> float:
    """Bytes a fused computation reads of its parameter ``idx`` (``full`` bytes): only the slices
    that dynamic-slice / slice / gather take, nothing for the buffer of an in-place
    dynamic-update-slice, following bitcasts and nested fusions."""
    names = {i.name for i in fused if i.opcode == "parameter" and i.operands[:1] == [str(idx)]}
    total = 0.0
    for _ in range(8):  # bitcasts of the parameter read the same buffer
        more = {i.name for i in fused if i.opcode == "bitcast" and i.operands and i.operands[0] in names}
        if more <= names:
            break
        names |= more
    for u in fused:
        for k, o in enumerate(u.operands):
            if o not in names or u.opcode == "bitcast":
                continue
            if u.opcode in ("dynamic-slice", "slice", "gather") and k == 0:
                total += _bytes(u.type)
            elif u.opcode == "dynamic-update-slice" and k == 0:
                pass  # updated in place
            elif u.opcode == "fusion" and depth < 4:
                m = re.search(r"calls=%?([\w.\-]+)", u.attrs)
                inner = comps.get(m.group(1)) if m else None
                total += full if inner is None else _param_read(comps, inner, k, full, depth + 1)
            else:
                return full
    return min(total, full)


def _fusion_bytes(ins: _Instr, fused: list, shapes: dict, comps: dict) -> float:
    """HBM bytes of one fusion: each operand read once (:func:`_param_read`); the result written
    once, or only the update of a root dynamic-update-slice."""
    local = {i.name: i for i in fused}
    total = sum(_param_read(comps, fused, k, _bytes(shapes.get(o, ""))) for k, o in enumerate(ins.operands))
    root = fused[-1] if fused else None
    outs = [local.get(o) for o in root.operands] if root is not None and root.opcode == "tuple" else [root]
    for o in outs:
        while o is not None and o.opcode == "bitcast" and o.operands and o.operands[0] in local:
            o = local[o.operands[0]]
        if o is not None and o.opcode == "dynamic-update-slice" and len(o.operands) > 1:
            total += _bytes(local[o.operands[1]].type) if o.operands[1] in local else 0.0
        elif o is not None:
            total += _bytes(o.type)
    return total


def _instr_bytes(ins: _Instr, shapes: dict, comps: dict) -> float:
    if ins.opcode in _NO_TRAFFIC or ins.opcode.endswith("-done"):
        return 0.0
    if ins.opcode == "fusion":
        m = re.search(r"calls=%?([\w.\-]+)", ins.attrs)
        if m and m.group(1) in comps:
            return _fusion_bytes(ins, comps[m.group(1)], shapes, comps)
    if ins.opcode in ("dynamic-slice", "slice", "gather"):
        return 2 * _bytes(ins.type)
    if ins.opcode == "dynamic-update-slice" and len(ins.operands) > 1:
        return 2 * _bytes(shapes.get(ins.operands[1], ""))
    return _bytes(ins.type) + sum(_bytes(shapes.get(o, "")) for o in ins.operands)


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


def _devices(hlo_text: str) -> int:
    m = re.search(r"num_partitions=(\d+)", hlo_text[:2000])
    return int(m.group(1)) if m else 1


def hlo_flops(hlo_text: str) -> HloFlops:
    """Matmul (dot + convolution) FLOPs per device of an optimised, SPMD-partitioned HLO module,
    following fusions and calls, with each ``while`` body times its trip count and the most
    expensive branch of each conditional; also the HBM bytes and collective bytes per device (see
    the module docstring). Elementwise work is not counted in FLOPs; custom calls (Pallas kernels)
    are counted as sites only, and their operands and results as HBM traffic."""
    comps, entry = _parse_module(hlo_text)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    devices = _devices(hlo_text)
    zero = lambda: HloFlops(0.0, 0, 0, 0.0, {}, 0.0)
    memo: dict[tuple[str, bool], HloFlops] = {}

    def visit(comp: str, fused: bool) -> HloFlops:
        if (comp, fused) in memo:
            return memo[(comp, fused)]
        memo[(comp, fused)] = zero()
        local = {i.name: i for i in comps.get(comp, [])}
        shapes = {k: i.type for k, i in local.items()}
        acc = zero()

        def add(r: HloFlops, n: int = 1):
            acc.flops += n * r.flops
            acc.custom_calls += r.custom_calls
            acc.unknown_trip_counts += r.unknown_trip_counts
            acc.hbm_bytes += n * r.hbm_bytes
            acc.link_bytes += n * r.link_bytes
            for k, v in r.collective_bytes.items():
                acc.collective_bytes[k] = acc.collective_bytes.get(k, 0.0) + n * v

        for ins in comps.get(comp, []):
            if ins.opcode == "convolution":
                acc.flops += _conv_flops(ins, shapes)
            elif ins.opcode == "dot":
                acc.flops += _dot_flops(ins, shapes)
            elif ins.opcode == "custom-call" and "tpu_custom_call" in ins.attrs:
                acc.custom_calls += 1  # a Pallas (Mosaic) kernel
            elif ins.opcode in _COLLECTIVES:
                kind, payload, sent = _collective(ins, shapes, devices)
                acc.collective_bytes[kind] = acc.collective_bytes.get(kind, 0.0) + payload
                acc.link_bytes += sent
            if not fused:
                acc.hbm_bytes += _instr_bytes(ins, shapes, comps)
            if ins.opcode == "while":
                n = _trip_count(ins, comps, local)
                acc.unknown_trip_counts += n is None
                for key in ("body", "condition"):
                    m = re.search(rf"\b{key}=%?([\w.\-]+)", ins.attrs)
                    if m:
                        add(visit(m.group(1), False), 1 if n is None else n)
                continue
            if ins.opcode in _COMBINERS:
                continue
            called = [m.group(2) for m in _CALLS.finditer(ins.attrs)]
            for m in _LISTS.finditer(ins.attrs):
                called += [c.strip().lstrip("%") for c in m.group(1).split(",") if c.strip()]
            inner = fused or ins.opcode == "fusion"
            if ins.opcode == "conditional":
                add(max((visit(c, inner) for c in called), key=lambda r: (r.flops, r.hbm_bytes), default=zero()))
            else:
                for c in called:
                    add(visit(c, inner))
        memo[(comp, fused)] = acc
        return acc

    return visit(entry, False)
