"""``python -m mufun_jax.data validate DATASET [--tokenizer DIR]``: count good and bad samples by reason.

Without a tokenizer it checks the structure of every record, its audio files (decoded), segments
and ``<audio>`` tag counts; with one it also checks the label masks and, with ``--seq-len``, the
length of each sample once its audio is expanded. Relative audio paths resolve exactly as in
training: against ``--audio-root``, else the dataset file's folder.

Exit status: 0 at least one usable sample, 1 no usable sample at all, 2 bad input (a missing
dataset or tokenizer, a broken JSON list: one line names it).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mufun_jax.cli_base import ArgumentParser, add_common, run_cli
from mufun_jax.data.dataset import dataset_tokenizer, validate
from mufun_jax.data.templates import get_template

EXIT_NO_SAMPLES = 1

# --help shows the docstring as plain text, without its reStructuredText markup
DESCRIPTION = __doc__.replace("``", "")


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.data", description=DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate", help="scan a dataset and print the skip counts by reason",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    v.add_argument("dataset", help="JSON list or JSONL file of MuFun records")
    v.add_argument("--tokenizer", default=None, help="checkpoint or tokenizer directory (AutoTokenizer); without "
                                                     "it the token checks are skipped")
    v.add_argument("--seq-len", type=int, default=None, help="with --tokenizer: count samples longer than this "
                                                             "(audio slots included) as too_long")
    v.add_argument("--tokens-per-chunk", type=int, default=300, help="audio tokens per 30 s chunk (300 for MuFun)")
    v.add_argument("--audio-root", default=None, help="folder that relative audio paths are under (default: the "
                                                      "dataset file's folder, as in training)")
    v.add_argument("--template", default="qwen2_instruct", help="qwen2_instruct (default), qwen2_base or pretrain")
    add_common(v)
    v.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)  # old spelling: no bar, no warnings
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR if args.quiet else logging.WARNING, format="%(levelname)s %(message)s")
    if args.seq_len is not None and args.tokenizer is None:
        ap.error("--seq-len needs --tokenizer (lengths are counted in tokens)")
    return run_cli(f"{ap.prog} {args.cmd}", lambda: _validate(args), args.debug)


def _validate(args) -> int:
    template = get_template(args.template)
    tok = dataset_tokenizer(args.tokenizer) if args.tokenizer else None
    good, counter = validate(args.dataset, template=template, tokenizer=tok, audio_root=args.audio_root,
                             seq_len=args.seq_len, tokens_per_chunk=args.tokens_per_chunk,
                             progress=not (args.no_progress or args.quiet))
    print(f"good samples: {good}\nskipped: {sum(counter.values())}\n{counter.report()}")
    if tok is None:
        print("token checks skipped (no --tokenizer): label masks and lengths were not checked")
    if good == 0:
        print(f"{args.dataset}: no usable sample (exit status {EXIT_NO_SAMPLES}); see the reasons above",
              file=sys.stderr)
        return EXIT_NO_SAMPLES
    return 0


if __name__ == "__main__":
    sys.exit(main())
