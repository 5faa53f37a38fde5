"""Command-line front ends (``train.py`` / ``mufun-train``); the work is in the library modules."""

from __future__ import annotations

import argparse
import logging
import sys


def _logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("mufun_jax").setLevel(logging.INFO)  # ours, without Orbax's per-file INFO lines
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.WARNING)
    except ImportError:
        pass


def train_main(argv=None) -> int:
    """Train or resume MuFun from a YAML config with ``key=value`` overrides."""
    ap = argparse.ArgumentParser(
        prog="train.py", description="Train MuFun (resumes from the newest checkpoint in output_dir).",
        epilog="example: python train.py --config configs/demo.yaml max_steps=50 optim.lr=1e-3 mesh.fsdp=-1")
    ap.add_argument("--config", required=True, help="YAML training config (see configs/)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. data.batch_size=16")
    ap.add_argument("--profile", action="store_true", help="write a jax.profiler trace of steps 3-5 to "
                                                           "OUTPUT_DIR/profile (open it with TensorBoard or Perfetto)")
    args = ap.parse_args(argv)
    _logging()

    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import NonFiniteLossError, train

    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        return 2
    try:
        result = train(cfg, profile=args.profile)
    except NonFiniteLossError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    print(f"done at step {result['step']}: loss {result.get('loss', float('nan')):.4f}"
          + (f", eval loss {result['eval_loss']:.4f}" if "eval_loss" in result else "")
          + f"; model written to {cfg.output_dir}/model")
    return 0
