"""The CPU demo behind ``make demo``: synthesise a small music dataset and a tokenizer offline,
then (after ``train.py`` has run both stages) answer held-out clips in batches and score them.

  python -m mufun_jax.demo prepare DIR            # DIR/{train,eval}.json, DIR/audio/, DIR/tokenizer/
  python -m mufun_jax.demo evaluate MODEL DIR     # batched greedy answers for DIR/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def prepare(out_dir: str | Path, *, n_train: int = 960, n_eval: int = 48, seed: int = 0) -> dict:
    from mufun_jax.data.synth import make_dataset
    from mufun_jax.data.tokenizer import build_tokenizer, corpus_for

    info = make_dataset(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    records = json.loads(Path(info["train"]).read_text())
    tok = build_tokenizer(corpus_for(records), Path(out_dir) / "tokenizer", vocab_size=512)
    print(f"demo data: {info['n_train']} training and {info['n_eval']} held-out clips in {out_dir}; "
          f"tokenizer with {len(tok)} tokens")
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mufun_jax.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="synthesise the dataset and build the tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=960)
    p.add_argument("--n-eval", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="answer the held-out clips with a trained model and print the accuracy")
    e.add_argument("model", help="a model directory written by train.py (OUTPUT_DIR/model)")
    e.add_argument("data_dir")
    e.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args(argv)
    if args.cmd == "prepare":
        prepare(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
        return 0
    return evaluate(args.model, args.data_dir, batch_size=args.batch_size)


if __name__ == "__main__":
    sys.exit(main())
