"""``python -m mufun_jax.data validate DATASET --tokenizer DIR``: count good and bad samples by reason."""

from __future__ import annotations

from mufun_jax.cli import ArgumentParser
import logging
import sys


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="scan a dataset and print the skip counts by reason")
    v.add_argument("dataset", help="JSON list or JSONL file of MuFun records")
    v.add_argument("--tokenizer", required=True, help="checkpoint or tokenizer directory (AutoTokenizer)")
    v.add_argument("--audio-root", default=None, help="folder that relative audio paths are under")
    v.add_argument("--template", default="qwen2_instruct", help="qwen2_instruct (default), qwen2_base or pretrain")
    v.add_argument("--quiet", action="store_true", help="no per-sample warnings, no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")

    from mufun_jax.data.dataset import dataset_tokenizer, validate
    from mufun_jax.data.templates import get_template

    good, counter = validate(args.dataset, template=get_template(args.template),
                             tokenizer=dataset_tokenizer(args.tokenizer), audio_root=args.audio_root,
                             progress=not args.quiet)
    print(f"good samples: {good}\nskipped: {sum(counter.values())}\n{counter.report()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
