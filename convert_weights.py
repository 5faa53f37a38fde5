#!/usr/bin/env python3
"""Convert MuFun weights between PyTorch checkpoints and this project's Orbax directory.

  import SRC DST                       released combined checkpoint, or MuFun's per-component folders
  import --whisper W --qwen3 Q --connector blp_4i_2x DST
                                       plain HF Whisper + Qwen3 checkpoints, connector initialised from --seed
  export SRC DST                       back to the combined HF layout (sharded safetensors + index)
"""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint -> converted Orbax directory")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or only DST with --whisper/--qwen3")
    imp.add_argument("--whisper", help="HF Whisper folder (WhisperForConditionalGeneration or WhisperModel); "
                                       "the decoder is dropped")
    imp.add_argument("--qwen3", help="HF Qwen3ForCausalLM folder")
    imp.add_argument("--connector", help="connector type for a fresh connector, e.g. blp_4i_2x")
    imp.add_argument("--taps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                     help="Whisper hidden-state taps for a fresh model, comma separated (default 0,7,15,32, "
                          "MuFun's; set it for encoders that are not 32 layers deep)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the fresh connector's initialisation (default 0)")
    exp = sub.add_parser("export", help="converted Orbax directory -> combined HF layout (safetensors)")
    exp.add_argument("paths", nargs=2, metavar="PATH", help="SRC DST")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GB)")
    for p in (imp, exp):
        p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                       help="dtype of the written weights (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-read INFO lines

    from mufun_jax.torch_files import CheckpointError
    from mufun_jax.weights import export_checkpoint, import_checkpoint

    try:
        if args.cmd == "import":
            parts = bool(args.whisper or args.qwen3)
            if len(args.paths) != (1 if parts else 2):
                ap.error("import takes SRC DST, or DST alone with --whisper, --qwen3 and --connector")
            src, dst = (None, args.paths[0]) if parts else args.paths
            import_checkpoint(dst, src, whisper=args.whisper, qwen3=args.qwen3, connector_type=args.connector,
                              taps=args.taps, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite,
                              progress=not args.no_progress)
        else:
            export_checkpoint(*args.paths, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                              overwrite=args.overwrite, progress=not args.no_progress)
    except (CheckpointError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"convert_weights.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
