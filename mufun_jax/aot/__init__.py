"""Ahead-of-time compilation for TPU topologies on any host with libtpu, by concern:

- :mod:`.topology`: the TPU slice catalogue, compile-only devices and meshes;
- :mod:`.hlo`: matmul FLOPs of an optimised HLO module with loops multiplied out;
- :mod:`.drivers`: the compile drivers (the real train step; prefill and decode from the
  generator's public functions) and the per-chip report.

Model FLOP formulas live in :mod:`mufun_jax.flops`, shared with ``bench/compare.py``.

CLI: ``python -m mufun_jax.aot train|infer|topologies``; ``train.py --compile-only`` and
``infer.py --compile-only`` call the same drivers.
"""

from mufun_jax.aot.drivers import AotResult, compile_infer, compile_step, compile_train, format_table, not_fitting
from mufun_jax.aot.hlo import HloFlops, hlo_flops
from mufun_jax.aot.topology import (GiB, TOPOLOGIES, TPU_SPECS, Topology, TpuSpec, get_topology, resolve_topology,
                                    topology_mesh)

__all__ = ["AotResult", "GiB", "HloFlops", "TOPOLOGIES", "TPU_SPECS", "Topology", "TpuSpec", "compile_infer",
           "compile_step", "compile_train", "format_table", "get_topology", "hlo_flops", "not_fitting",
           "resolve_topology", "topology_mesh"]
