"""Command-line front ends (``train.py`` / ``mufun-train``, ``infer.py`` / ``mufun-infer``,
``convert_weights.py`` / ``mufun-convert``, ``mufun-plot``); the work is in the library modules.

Every CLI takes ``--kebab-case`` flags; the ``--snake_case`` spellings of earlier versions are
still accepted as hidden aliases (:class:`ArgumentParser`). Every CLI runs its work through
:func:`run_cli`, so an expected failure (a missing file, bad YAML, a bad value, a corrupt
checkpoint) ends in one line that names the problem, with exit status 2, and a traceback only
with ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import sys

# the plumbing every CLI shares lives in cli_base, so that lower CLIs need not import this module;
# tagging, evaluation and the tests still import it from here
from mufun_jax.cli_base import (ArgumentParser, DefaultsHelpFormatter, add_common, invoked_as, run_cli,  # noqa: F401
                                setup_logging)
from mufun_jax.compile_cache import enable_compile_cache
from mufun_jax.errors import EXIT_PREEMPTED



def train_main(argv=None) -> int:
    """Train or resume MuFun from a YAML config with ``key=value`` overrides."""
    ap = ArgumentParser(
        prog=invoked_as("train.py", "mufun-train"),
        description="Train MuFun (resumes from the newest checkpoint in output_dir, if its model and trainable "
                    "modules match the config). Exit status: 0 done, 2 bad input (one line names it), 3 the loss "
                    f"became NaN/inf, {EXIT_PREEMPTED} preempted after saving (run the same command again).",
        epilog="example: python train.py --config configs/demo.yaml max_steps=50 optim.lr=1e-3 mesh.fsdp=-1")
    ap.add_argument("--config", required=True, help="YAML training config (see configs/)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=16")
    ap.add_argument("--profile", action="store_true", help="write a jax.profiler trace of steps 3-5 to "
                                                           "OUTPUT_DIR/profile (open it with TensorBoard or Perfetto)")
    ap.add_argument("--force", action="store_true", help="resume OUTPUT_DIR's checkpoints even though the saved "
                    "model or trainable modules differ from the config (default: refuse, naming the differences)")
    ap.add_argument("--compile-only", action="store_true", help="compile the train step for --topology on this "
                    "host (needs libtpu, no TPU), print per-chip memory and FLOPs; exit 1 if it does not fit")
    ap.add_argument("--topology", default=None, help="TPU slice for --compile-only: v5p-128, v6e-64, v5e-256, ...")
    ap.add_argument("--num-slices", type=int, default=1, help="slices of a multi-slice job (--compile-only)")
    add_common(ap)
    args = ap.parse_intermixed_args(argv)  # KEY=VALUE overrides before and after flags alike
    if args.compile_only != (args.topology is not None):
        ap.error("--compile-only and --topology go together")
    setup_logging()
    if not args.compile_only:  # XLA:TPU programs compiled without a TPU cannot be read back from the cache
        enable_compile_cache()
    return run_cli(ap.prog, lambda: _train(ap.prog, args), args.debug)


def _train(prog: str, args) -> int:
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import NonFiniteLossError, train

    cfg = TrainConfig.load(args.config, args.overrides)
    if args.no_progress:
        cfg.progress = False
    if args.compile_only:
        from mufun_jax.aot.drivers import train_compile_only

        try:
            return train_compile_only(cfg, args.topology, num_slices=args.num_slices)
        except RuntimeError as e:
            raise ValueError(str(e)) from e
    try:
        if cfg.recipe == "grpo":  # hand-off: GRPO has its own loop (mufun_jax/grpo/trainer.py)
            from mufun_jax.grpo.trainer import train
        result = train(cfg, profile=args.profile, force=args.force)
        if result.get("preempted"):
            return EXIT_PREEMPTED
    except NonFiniteLossError as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 3
    print(f"done at step {result['step']}: loss {result.get('loss', float('nan')):.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
          + f"; model written to {cfg.output_dir}/model")
    return 0


CONVERT_HELP = """Convert MuFun weights between PyTorch checkpoints and this project's model directory.

  import SRC DST                       released combined checkpoint, or MuFun's per-component folders
  import --whisper W --qwen3 Q --connector blp_4i_2x DST
                                       plain HF Whisper + Qwen3 checkpoints, connector initialised from --seed
  export SRC DST                       back to the combined HF layout (sharded safetensors + index)
  export-adapter RUN DST [--merge]     a LoRA training run's newest checkpoint as a PEFT adapter (HF module
                                       names), or with --merge the whole model in the combined HF layout
"""


def convert_main(argv=None) -> int:
    """``convert_weights.py`` / ``mufun-convert``."""
    ap = ArgumentParser(prog=invoked_as("convert_weights.py", "mufun-convert"), description=CONVERT_HELP,
                        epilog="exit status: 0 written, 2 bad input (one line names it; nothing is left at DST)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    imp = sub.add_parser("import", help="PyTorch checkpoint -> model directory")
    imp.add_argument("paths", nargs="+", metavar="PATH", help="SRC DST, or only DST with --whisper/--qwen3")
    imp.add_argument("--whisper", help="HF Whisper folder (WhisperForConditionalGeneration or WhisperModel); "
                                       "the decoder is dropped")
    imp.add_argument("--qwen3", help="HF Qwen3ForCausalLM folder")
    imp.add_argument("--connector", help="connector type for a fresh connector, e.g. blp_4i_2x")
    imp.add_argument("--taps", type=lambda v: [int(x) for x in v.split(",")], default=None,
                     help="Whisper hidden-state taps for a fresh model, comma separated (default 0,7,15,32, "
                          "MuFun's; set it for encoders that are not 32 layers deep)")
    imp.add_argument("--seed", type=int, default=0, help="seed of the fresh connector's initialisation (default 0)")
    exp = sub.add_parser("export", help="model directory -> combined HF layout (safetensors)")
    exp.add_argument("paths", nargs=2, metavar="PATH", help="SRC DST")
    exp.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (default 5 GB)")
    ada = sub.add_parser("export-adapter", help="LoRA training run -> PEFT adapter (or, --merge, merged HF layout)")
    ada.add_argument("paths", nargs=2, metavar="PATH", help="RUN (train.py's output_dir) DST")
    ada.add_argument("--merge", action="store_true", help="merge the adapters into the base model (init_from) and "
                     "write the whole model in the combined HF layout, fully trained modules included")
    ada.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard with --merge")
    for p in (imp, exp, ada):
        p.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"],
                       help="dtype of the written weights (default: keep the source's)")
        p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
        add_common(p)
    args = ap.parse_args(argv)
    if args.cmd == "import" and len(args.paths) != (1 if (args.whisper or args.qwen3) else 2):
        ap.error("import takes SRC DST, or DST alone with --whisper, --qwen3 and --connector")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-read INFO lines
    return run_cli(f"{ap.prog} {args.cmd}", lambda: _convert(args), args.debug)


def _convert(args) -> int:
    from mufun_jax.weights import export_checkpoint, import_checkpoint

    if args.cmd == "import":
        src, dst = (None, args.paths[0]) if (args.whisper or args.qwen3) else args.paths
        import_checkpoint(dst, src, whisper=args.whisper, qwen3=args.qwen3, connector_type=args.connector,
                          taps=args.taps, seed=args.seed, dtype=args.dtype, overwrite=args.overwrite,
                          progress=not args.no_progress)
    elif args.cmd == "export":
        export_checkpoint(*args.paths, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                          overwrite=args.overwrite, progress=not args.no_progress)
    else:
        from mufun_jax.peft_export import export_adapter

        export_adapter(*args.paths, merge=args.merge, dtype=args.dtype, max_shard_gb=args.max_shard_gb,
                       overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def plot_main(argv=None) -> int:
    """``mufun-plot RUN_DIR [RUN_DIR ...]``: the loss curves of training runs, as one PNG."""
    ap = ArgumentParser(prog="mufun-plot", description="Plot the train and eval loss of train.py runs from their "
                        "metrics.jsonl; several runs (e.g. two stages) follow each other on one step axis.",
                        epilog="exit status: 0 written, 2 bad input (a run without metrics: nothing is written)")
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="train.py output_dir(s)")
    ap.add_argument("--out", default=None, help="PNG to write (default: RUN_DIR/loss.png of the last run)")
    add_common(ap, progress=False)
    args = ap.parse_args(argv)
    return run_cli(ap.prog, lambda: _plot(args), args.debug)


def _plot(args) -> int:
    from pathlib import Path

    from mufun_jax.metrics import plot_runs

    out = plot_runs(args.runs, args.out or Path(args.runs[-1]) / "loss.png")
    print(f"wrote {out}")
    return 0
