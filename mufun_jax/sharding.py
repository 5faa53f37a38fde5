"""Logical axis names -> device mesh axes.

Every parameter carries ``logical_axes`` metadata (e.g. ``('layers', 'embed', 'mlp')``).
A rule table maps each logical name to a mesh axis (``data``, ``fsdp``, ``tensor``) or to
None (replicated), so the same model code shards differently by changing the rules only.
"""

from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

# FSDP shards the model width, tensor parallelism the heads / FFN / vocabulary.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("audio_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("head_dim", None),
    ("positions", None),
    ("conv_window", None),
    ("conv_in", None),
    ("mel", None),
)


def mesh_sizes(data: int, fsdp: int, tensor: int, n: int, what: str = "devices") -> list[int]:
    """The (data, fsdp, tensor) sizes of a mesh over ``n`` ``what`` (devices, chips per slice), with
    one size allowed to be -1 for "all remaining"; a clear error when they do not multiply to ``n``."""
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh sizes {dict(zip(MESH_AXES, sizes))}: at most one may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"{n} {what} cannot be split into mesh {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} {what}, have {n}")
    return sizes


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh; one size may be -1 for "all remaining devices"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = mesh_sizes(data, fsdp, tensor, len(devices))
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(axes: Sequence[str | None], rules=DEFAULT_RULES, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec. A mesh axis is used at most once per array; with
    ``shape`` and ``mesh``, a dimension that the mesh axes do not divide is replicated (logged)."""
    table: Mapping = dict(rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        targets = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        targets = tuple(t for t in targets if t not in used)
        if targets and shape is not None and mesh is not None:
            n = math.prod(mesh.shape[t] for t in targets)
            if shape[i] % n:
                log.warning("axis %r of size %d is not divisible by mesh %s=%d: replicated", name, shape[i],
                            targets, n)
                targets = ()
        used.update(targets)
        out.append(None if not targets else (targets[0] if len(targets) == 1 else targets))
    return PartitionSpec(*out)


def param_shardings(tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every variable of an nnx module or state, from its logical axes."""
    state = tree if isinstance(tree, nnx.State) else nnx.state(tree)

    def one(v):
        axes = v.get_metadata("logical_axes", None)
        if axes is None:
            raise ValueError(f"variable of shape {v.shape} has no logical_axes metadata")
        return NamedSharding(mesh, logical_to_spec(axes, rules, v.shape, mesh))

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def mesh_from_flag(text: str, devices: Sequence | None = None) -> Mesh:
    """The ``--mesh DATA,FSDP,TENSOR`` flag of infer.py and mufun-serve (one size may be -1: the
    remaining devices) over this host's devices; e.g. ``1,1,-1`` is tensor parallel over all, and
    ``1,1,2`` on a 4-device host uses the first two."""
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) != 3 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"--mesh {text!r} must be three sizes DATA,FSDP,TENSOR (one may be -1), e.g. 1,1,-1")
    devices = list(jax.local_devices() if devices is None else devices)
    if -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[:math.prod(sizes)]  # an explicit smaller mesh uses the first devices
    return make_mesh(*sizes, devices=devices)
