"""``python -m mufun_jax.data validate DATASET [--tokenizer DIR]``: count good and bad samples by reason.

Without a tokenizer it checks the structure of every record, its audio files (decoded), segments
and ``<audio>`` tag counts; with one it also checks the label masks and, with ``--seq-len``, the
length of each sample once its audio is expanded.
"""

from __future__ import annotations

import logging
import sys

from mufun_jax.cli import ArgumentParser


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="scan a dataset and print the skip counts by reason")
    v.add_argument("dataset", help="JSON list or JSONL file of MuFun records")
    v.add_argument("--tokenizer", default=None, help="checkpoint or tokenizer directory (AutoTokenizer); without "
                                                     "it the token checks are skipped")
    v.add_argument("--seq-len", type=int, default=None, help="with --tokenizer: count samples longer than this "
                                                             "(audio slots included) as too_long")
    v.add_argument("--tokens-per-chunk", type=int, default=300, help="audio tokens per 30 s chunk (300 for MuFun)")
    v.add_argument("--audio-root", default=None, help="folder that relative audio paths are under")
    v.add_argument("--template", default="qwen2_instruct", help="qwen2_instruct (default), qwen2_base or pretrain")
    v.add_argument("--quiet", action="store_true", help="no per-sample warnings, no progress bar")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
    if args.seq_len is not None and args.tokenizer is None:
        ap.error("--seq-len needs --tokenizer (lengths are counted in tokens)")

    from mufun_jax.data.dataset import dataset_tokenizer, validate
    from mufun_jax.data.templates import get_template

    tok = dataset_tokenizer(args.tokenizer) if args.tokenizer else None
    good, counter = validate(args.dataset, template=get_template(args.template), tokenizer=tok,
                             audio_root=args.audio_root, seq_len=args.seq_len,
                             tokens_per_chunk=args.tokens_per_chunk, progress=not args.quiet)
    print(f"good samples: {good}\nskipped: {sum(counter.values())}\n{counter.report()}")
    if tok is None:
        print("token checks skipped (no --tokenizer): label masks and lengths were not checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
