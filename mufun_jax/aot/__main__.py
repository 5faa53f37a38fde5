"""``python -m mufun_jax.aot train|infer|topologies``: compile MuFun steps for a TPU topology on this
host (needs libtpu, no TPU) and report per-chip memory and FLOPs; exit 1 if a step does not fit."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

# none of these imports jax: the platform is chosen below, before jax is first imported
from mufun_jax.aot.drivers import compile_infer, compile_train, report
from mufun_jax.aot.topology import TOPOLOGIES, TPU_SPECS
from mufun_jax.checkpoint import load_config
from mufun_jax.cli_base import ArgumentParser
from mufun_jax.train_config import TrainConfig


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.aot", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="the train step of a training config")
    t.add_argument("--config", required=True)
    t.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    t.add_argument("--attention-impl", default=None, help="override the config's attention backend (its auto is "
                                                          "splash on TPU)")
    t.add_argument("--text-only", action="store_true", help="a batch without audio: the LLM alone")
    i = sub.add_parser("infer", help="the prefill and one decode step of batched inference")
    i.add_argument("--batch", type=int, required=True, help="rows per batch")
    i.add_argument("--context", type=int, required=True, help="prompt length (tokens, audio slots included)")
    i.add_argument("--new-tokens", type=int, default=512, help="decode steps the KV cache holds room for")
    i.add_argument("--chunks-per-row", type=int, default=None, help="30 s audio chunks per row (default: half "
                                                                     "the context)")
    i.add_argument("--mesh", default="1,1,-1", help="data,fsdp,tensor (default: tensor parallel over a slice)")
    i.add_argument("--prefill-chunk", type=int, default=None)
    i.add_argument("--init-from", default=None, help="a model directory (its mufun_config.json); "
                                                     "default: the mufun-8b preset")
    for p in (t, i):
        p.add_argument("--topology", required=True, help="v5p-128, v6e-64, v5e-256, ... or e.g. v5e:2x2")
        p.add_argument("--num-slices", type=int, default=1)
        p.add_argument("--json", default=None, help="also write the results to this JSON file")
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
            cfg = TrainConfig.load(args.config, args.overrides)
            results = [compile_train(cfg, args.topology, num_slices=args.num_slices,
                                     attention_impl=args.attention_impl, text_only=args.text_only)]
        else:
            model_cfg = None
            if args.init_from:
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
        Path(args.json).write_text(json.dumps([dataclasses.asdict(r) for r in results], indent=1))
    return report(results, "aot")


if __name__ == "__main__":
    sys.exit(main())
