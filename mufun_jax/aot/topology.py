"""TPU slices this host can compile for: the chip catalogue, compile-only devices and meshes.

On any host with ``libtpu`` installed (``pip install -e '.[tpu]'``; no TPU needed), JAX can
describe a TPU pod slice (``jax.experimental.topologies.get_topology_desc``) and compile for it:
the devices are "compile only".
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile

import numpy as np

GiB = 1024**3


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """One TPU generation, per chip. ``hbm_gib`` and ``bf16_tflops`` are the Cloud TPU system
    architecture pages' figures (cloud.google.com/tpu/docs/v5p, /v6e, /v5e): v5p 95 GB HBM2e and
    459 bf16 TFLOP/s; v6e (Trillium) 32 GB and 918; v5e 16 GB and 197. ``usable_gib`` is what
    libtpu's compiler lets a program use (its out-of-memory message quotes it: 95.74, 31.25 and
    15.75 GiB with libtpu 0.0.42); fitting is judged against it. ``hbm_gbs`` and ``ici_gbs`` (HBM
    bandwidth and bidirectional inter-chip bandwidth, GB/s per chip) are the same pages' figures,
    used by the roofline of bench/tpu_vs_maxtext.py: v5p 2765 and 1200, v6e 1638 and 800, v5e 819
    and 400."""

    kind: str  # the prefix of a topology name in get_topology_desc: "v5", "v6e", "v5e"
    chip_config: str  # "megacore" (v5p: the two TensorCores of a chip are one device) or "default"
    hbm_gib: float
    usable_gib: float
    bf16_tflops: float
    chips_per_host: tuple[int, int, int]
    hbm_gbs: float = 0.0
    ici_gbs: float = 0.0


TPU_SPECS = {
    "v5p": TpuSpec("v5", "megacore", 95.0, 95.74, 459.0, (2, 2, 1), hbm_gbs=2765.0, ici_gbs=1200.0),
    "v6e": TpuSpec("v6e", "default", 32.0, 31.25, 918.0, (2, 2, 1), hbm_gbs=1638.0, ici_gbs=800.0),
    "v5e": TpuSpec("v5e", "default", 16.0, 15.75, 197.0, (2, 2, 1), hbm_gbs=819.0, ici_gbs=400.0),
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


def resolve_topology(name: str) -> tuple[str, str, TpuSpec]:
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
def quiet_stderr():
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


def wraparound(topology_name: str) -> tuple[bool, bool, bool]:
    """Which axes of a slice close into rings (torus links). Cloud TPU's v5p page: every slice of
    one 4x4x4 cube or more is a full 3D torus; v5e/v6e close an axis of 16 chips (the same table
    as MaxText's accelerator_to_spec_map). It matters: without the links XLA cannot use its 3D
    all-gather on v5p and runs each FSDP weight gather as an all-reduce, twice the ICI bytes."""
    dims = [int(x) for x in topology_name.split(":")[1].split("x")]
    if len(dims) == 3:
        return (all(d >= 4 for d in dims),) * 3
    return tuple(d == 16 for d in dims) + (False,) * (3 - len(dims))


def get_topology(name: str, num_slices: int = 1) -> Topology:
    """Compile-only devices of a TPU slice (``num_slices`` > 1: a multi-slice job over DCN)."""
    _libtpu_env()
    import jax  # after _libtpu_env: jax reads the libtpu environment on import
    from jax.experimental import topologies

    gen, topo_name, spec = resolve_topology(name)
    if num_slices < 1:
        raise ValueError(f"num_slices={num_slices} must be >= 1")
    try:
        with quiet_stderr():
            desc = topologies.get_topology_desc(platform="tpu", topology_name=topo_name,
                                                chip_config_name=spec.chip_config,
                                                chips_per_host_bounds=spec.chips_per_host, num_slices=num_slices,
                                                wrap=wraparound(topo_name))
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
    # jax (and sharding, which imports it) only now: this package is imported before the CLI has
    # chosen JAX_PLATFORMS and the libtpu environment, which jax reads once, on import
    from jax.experimental import mesh_utils
    from jax.sharding import Mesh

    from mufun_jax.sharding import MESH_AXES, mesh_sizes

    sizes = mesh_sizes(data, fsdp, tensor, topo.chips // topo.num_slices, f"chips per slice of {topo.name}")
    if topo.num_slices == 1:
        devices = mesh_utils.create_device_mesh(sizes, list(topo.devices))
    else:
        devices = mesh_utils.create_hybrid_device_mesh(sizes, [topo.num_slices, 1, 1], list(topo.devices))
    return Mesh(np.asarray(devices), MESH_AXES)
