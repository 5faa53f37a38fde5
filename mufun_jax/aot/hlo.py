"""Matmul FLOPs of an optimised, SPMD-partitioned HLO module, with loops multiplied out.

``compiled.cost_analysis()`` counts a ``while`` body once, which for scanned layers undercounts by
the layer count; this counter reads the HLO text, follows fusions and calls, and multiplies each
loop body by its trip count.
"""

from __future__ import annotations

import dataclasses
import math
import re

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
