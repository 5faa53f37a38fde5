#!/usr/bin/env python3
"""Benchmark (not a test): convert a synthetic full-size MuFun-8B checkpoint and back.

Writes random bf16 tensors with the real shapes and key names (about 17.8 GB in 4 safetensors
shards plus an index), runs `convert_weights.py import` and `export` each in a child process,
and prints wall time, MB/s and the child's peak RSS for each direction. Needs about 55 GB of
free disk under --workdir.

    python bench/convert_full_size.py --workdir /tmp/mufun-bench [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

from mufun_jax.config import preset
from mufun_jax.convert import COMBINED_PREFIX, COMPONENTS, FLAX_ROOT, rules
from mufun_jax.torch_files import write_safetensors_shards
from mufun_jax.weights import expected_shapes, torch_shape


def write_synthetic(folder: Path, seed: int = 0) -> int:
    import ml_dtypes
    from tqdm import tqdm

    cfg = preset("mufun-8b")
    shapes = expected_shapes(cfg)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = []
    for comp in COMPONENTS:
        for rule in rules(cfg, comp):
            ts = torch_shape(rule, shapes[(FLAX_ROOT[comp],) + rule.path])
            entries += [(COMBINED_PREFIX[comp] + k, ts, bf16) for k in rule.torch_keys()]
    total = sum(int(np.prod(s)) * 2 for _, s, _ in entries)
    # Four shards of about equal size, as the release has: a tensor goes to the shard its start falls in.
    shards, start = [[] for _ in range(4)], 0
    for key, shape, dtype in entries:
        shards[min(3, start * 4 // total)].append((key, shape, dtype))
        start += int(np.prod(shape)) * 2
    rng = np.random.default_rng(seed)

    def tensors():
        for key, shape, _ in entries:
            # Random finite bf16 values (exponent kept in range), so nothing in the path can special-case them.
            bits = rng.integers(0x3C00, 0x4000, size=shape, dtype=np.uint16) | (
                rng.integers(0, 2, size=shape, dtype=np.uint16) << 15)
            yield key, bits.view(bf16)

    folder.mkdir(parents=True)
    with tqdm(total=total, unit="B", unit_scale=True, desc="synthetic") as bar:
        write_safetensors_shards(folder, shards, tensors(), bar)
    (folder / "config.json").write_text(json.dumps(cfg.to_tinyllava(), indent=2))
    return total


def run(cmd: list[str], rss_file: Path) -> tuple[float, float]:
    """Wall seconds and that child's own peak RSS in GB (ru_maxrss read inside the child)."""
    t = time.perf_counter()
    code = ("import resource, sys, runpy\n"
            "sys.argv = sys.argv[2:]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    open(%r, 'w').write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))\n"
            % str(rss_file))
    subprocess.run([sys.executable, "-c", code, "-", *cmd], check=True)
    wall = time.perf_counter() - t
    return wall, int(rss_file.read_text()) / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mufun-convert-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the files afterwards")
    args = ap.parse_args()
    w = args.workdir
    shutil.rmtree(w, ignore_errors=True)
    t = time.perf_counter()
    total = write_synthetic(w / "src")
    print(f"synthetic checkpoint: {total / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s")
    cli = str(ROOT / "convert_weights.py")
    results = {}
    wall, rss = run([cli, "import", str(w / "src"), str(w / "orbax"), "--no-progress"], w / "rss")
    results["import"] = (wall, rss)
    shutil.rmtree(w / "src")  # free the disk for the export
    wall, rss = run([cli, "export", str(w / "orbax"), str(w / "export"), "--no-progress"], w / "rss")
    results["export"] = (wall, rss)
    print(f"\n{'direction':<10}{'wall s':>10}{'MB/s':>10}{'peak RSS GB':>14}")
    for k, (wall, rss) in results.items():
        print(f"{k:<10}{wall:>10.1f}{total / 1e6 / wall:>10.0f}{rss:>14.2f}")
    largest = max(int(np.prod(s)) * 2 for s in expected_shapes(preset("mufun-8b")).values())
    print(f"largest stacked parameter: {largest / 1e9:.2f} GB (bf16)")
    if not args.keep:
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
