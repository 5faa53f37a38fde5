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

from mufun_jax.cli import ArgumentParser


def prepare(out_dir: str | Path, *, n_train: int = 960, n_eval: int = 48, seed: int = 0) -> dict:
    from mufun_jax.data.synth import make_dataset
    from mufun_jax.data.tokenizer import build_tokenizer, corpus_for

    info = make_dataset(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    records = json.loads(Path(info["train"]).read_text())
    tok = build_tokenizer(corpus_for(records), Path(out_dir) / "tokenizer", vocab_size=512)
    print(f"demo data: {info['n_train']} training and {info['n_eval']} held-out clips in {out_dir}; "
          f"tokenizer with {len(tok)} tokens")
    return info


def evaluate(model_dir: str | Path, data_dir: str | Path, *, batch_size: int = 16, show: int = 8) -> int:
    """Greedy answers for the held-out clips through the batched API (``mufun_jax.MuFun``); prints
    examples and the exact-match accuracy per task (chance is 1/4, 1/2 and 1/2)."""
    import collections

    from mufun_jax import MuFun

    model = MuFun.from_pretrained(model_dir, batch_size=batch_size, max_new_tokens=16)
    records = json.loads((Path(data_dir) / "eval.json").read_text())
    answers = model.generate(records, audio_root=data_dir)  # training-schema records: the first question
    right: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    print(f"{'task':<11} {'expected':<22} answer")
    for i, (r, answer) in enumerate(zip(records, answers)):
        total[r["task"]] += 1
        right[r["task"]] += answer == r["answer"]
        if i < show:
            print(f"{r['task']:<11} {r['answer']:<22} {answer}")
    for task in sorted(total):
        print(f"accuracy {task:<11} {right[task]:3d}/{total[task]:<3d} = {right[task] / total[task]:.0%}")
    n_right, n = sum(right.values()), sum(total.values())
    print(f"accuracy overall     {n_right:3d}/{n:<3d} = {n_right / n:.0%}  ({n} held-out clips)")
    return 0


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.demo", description=__doc__,
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
