"""AOT-compile the full-size MuFun-8B steps for TPU pod slices on this host and print one table.

Needs libtpu (``pip install -e '.[tpu]'``), no TPU. Each case runs ``python -m mufun_jax.aot`` in
its own process, one at a time (a 64-chip 8B compile takes ~5 GB of RAM and minutes of CPU).
The numbers in docs/tpu.md come from this script.

    python bench/aot_compile.py                       # the cases of docs/tpu.md
    python bench/aot_compile.py full_v5p128 warmup_v5p128
    python bench/aot_compile.py --list
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FULL, WARMUP = "configs/mufun8b_full.yaml", "configs/mufun8b_warmup.yaml"


def train(config, topology, *overrides, slices=1):
    return ["train", "--config", config, "--topology", topology, "--num-slices", str(slices), *overrides]


def rows(n, chunks_per_row=2, accum=2):
    return [f"data.batch_size={n}", f"data.max_chunks={chunks_per_row * n}", f"optim.grad_accum={accum}"]


CASES = {
    # the recipes as written: 192 rows x 2 accumulation = global batch 384, 384 chunks per micro-batch
    "full_v5p128": train(FULL, "v5p-128"),
    "warmup_v5p128": train(WARMUP, "v5p-128"),
    # v6e-64 (31.25 GiB usable per chip): rows per micro-batch must divide by the 64 chips
    "full_v6e64": train(FULL, "v6e-64"),
    "full_v6e64_384": train(FULL, "v6e-64", *rows(384)),
    "full_v6e64_448": train(FULL, "v6e-64", *rows(448)),
    "full_v6e64_512": train(FULL, "v6e-64", *rows(512)),
    # v5e-256 (15.75 GiB usable per chip): 256 rows per micro-batch at the least with pure FSDP;
    # fsdp 128 x tensor 2 allows the recipe's 192 rows
    "full_v5e256_256": train(FULL, "v5e-256", *rows(256)),
    "full_v5e256_512": train(FULL, "v5e-256", *rows(512)),
    "full_v5e256_768": train(FULL, "v5e-256", *rows(768)),
    "full_v5e256_tp2": train(FULL, "v5e-256", "mesh.fsdp=128", "mesh.tensor=2"),
    # what the memory tools do, on the tightest chip
    "full_v5e256_768_offload": train(FULL, "v5e-256", *rows(768), "remat_policy=offload"),
    "full_v5e256_512_no_loss_chunk": train(FULL, "v5e-256", *rows(512), "loss_chunk=0"),
    "full_v5e256_512_xla_attention": train(FULL, "v5e-256", *rows(512), "--attention-impl", "xla"),
    "full_v5e256_512_dots_except_mlp": train(FULL, "v5e-256", *rows(512), "remat_policy=dots_except_mlp"),
    # v6e-256 and two v5p-128 slices over DCN
    "full_v6e256": train(FULL, "v6e-256", *rows(256)),
    "full_v5p128x2": train(FULL, "v5p-128", *rows(256), slices=2),
    # inference: prefill of 32 prompts of 4096 tokens (6 audio chunks each) and one decode step
    # with room for 512 new tokens, tensor parallel over one v6e-8 / v5e-8 host
    "infer_v6e8": ["infer", "--topology", "v6e-8", "--batch", "32", "--context", "4096", "--new-tokens", "512",
                   "--chunks-per-row", "6"],
    "infer_v5e8": ["infer", "--topology", "v5e-8", "--batch", "32", "--context", "4096", "--new-tokens", "512",
                   "--chunks-per-row", "6"],
}
DEFAULT = ["full_v5p128", "warmup_v5p128", "full_v6e64_384", "full_v6e64_512", "full_v5e256_512", "full_v5e256_768",
           "full_v5e256_768_offload", "full_v5e256_512_no_loss_chunk", "full_v5e256_512_xla_attention", "infer_v6e8"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", help=f"default: {' '.join(DEFAULT)}")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "mufun_aot"),
                    help="folder for each case's JSON and log")
    args = ap.parse_args()
    if args.list:
        for k, v in CASES.items():
            print(f"{k:36s} {' '.join(v)}")
        return 0
    from mufun_jax.aot import AotResult, format_table

    out = Path(args.out)
    out.mkdir(exist_ok=True)
    results = []
    for name in args.cases or DEFAULT:
        if name not in CASES:
            print(f"unknown case {name}; --list shows them", file=sys.stderr)
            return 2
        js = out / f"{name}.json"
        t0 = time.time()
        cmd = [sys.executable, "-m", "mufun_jax.aot", *CASES[name], "--json", str(js)]
        with open(out / f"{name}.log", "w") as log:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode
        print(f"{name}: exit {rc} in {time.time() - t0:.0f} s", flush=True)
        if js.exists():
            for d in json.loads(js.read_text()):
                results.append(AotResult(**d))
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
