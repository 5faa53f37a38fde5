"""The CPU demo behind ``make demo``: synthesise a small music dataset and a tokenizer offline,
train a tiny MuFun in two stages, answer held-out clips in batches, and report.

  python -m mufun_jax.demo run [--out runs/demo]     # all of it, with a summary and runs/demo/report.png
  python -m mufun_jax.demo prepare DIR               # DIR/{train,eval}.json, DIR/audio/, DIR/tokenizer/
  python -m mufun_jax.demo evaluate MODEL DIR        # batched greedy answers for DIR/eval.json
  python -m mufun_jax.demo lora [--out runs/demo]    # after run: QLoRA teaches it a new instruction
  python -m mufun_jax.demo mc MODEL DIR [--out D]    # held-out clips as MuCUE-style multiple choice (mufun-eval)

``run`` is what ``make demo`` calls. Its stages are the commands a user would type
(``train.py --config configs/demo_warmup.yaml``, then ``configs/demo.yaml``), run in one process.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
import time
from pathlib import Path

from mufun_jax.cli import ArgumentParser
from mufun_jax.compile_cache import enable_compile_cache

CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # the repository's, next to the package


def prepare(out_dir: str | Path, *, n_train: int = 960, n_eval: int = 96, seed: int = 0) -> dict:
    from mufun_jax.data.synth import make_dataset
    from mufun_jax.data.tokenizer import build_tokenizer, corpus_for

    info = make_dataset(out_dir, n_train=n_train, n_eval=n_eval, seed=seed)
    records = json.loads(Path(info["train"]).read_text())
    tok = build_tokenizer(corpus_for(records), Path(out_dir) / "tokenizer", vocab_size=512)
    print(f"demo data: {info['n_train']} training and {info['n_eval']} held-out clips in {out_dir}; "
          f"tokenizer with {len(tok)} tokens")
    return info


def evaluate(model_dir: str | Path, data_dir: str | Path, *, batch_size: int = 16, show: int = 6,
             out: str | Path | None = None, eval_file: str = "eval.json") -> dict[str, tuple[int, int]]:
    """Greedy answers for the held-out clips through the batched API (``mufun_jax.MuFun``); prints
    examples, the exact-match accuracy per task (chance: instrument 1/4, register and notes 1/2) and
    the confusions.
    Returns ``{task: (right, total)}`` (also written to ``out`` as JSON)."""
    from mufun_jax import MuFun

    model = MuFun.from_pretrained(model_dir, batch_size=batch_size, max_new_tokens=16)
    records = json.loads((Path(data_dir) / eval_file).read_text())
    answers = model.generate(records, audio_root=data_dir)  # training-schema records: the first question
    right: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    wrong: collections.Counter = collections.Counter()
    print(f"{'task':<11} {'expected':<22} answer")
    for i, (r, answer) in enumerate(zip(records, answers)):
        total[r["task"]] += 1
        right[r["task"]] += answer == r["answer"]
        if answer != r["answer"]:
            wrong[(r["task"], r["answer"], answer)] += 1
        if i < show:
            print(f"{r['task']:<11} {r['answer']:<22} {answer}")
    for (task, want, got), n in sorted(wrong.items()):
        print(f"  {task}: {n} x {want!r} answered {got!r}")
    for task in sorted(total):
        print(f"accuracy {task:<11} {right[task]:3d}/{total[task]:<3d} = {right[task] / total[task]:.0%}")
    n_right, n = sum(right.values()), sum(total.values())
    print(f"accuracy overall     {n_right:3d}/{n:<3d} = {n_right / n:.0%}  ({n} held-out clips)")
    acc = {t: (right[t], total[t]) for t in sorted(total)}
    if out is not None:
        Path(out).write_text(json.dumps(acc, indent=1))
    return acc


def multiple_choice(data_dir: str | Path, eval_file: str = "eval.json") -> Path:
    """The held-out clips as MuCUE-style multiple choice, one subset per task: each clip's question
    with its task's answers as the options (``DIR/mc/eval.jsonl``, MuFun-style records, absolute
    audio paths). ``mufun-eval`` then scores a demo model the way MuCUE scores MuFun."""
    from mufun_jax.data.synth import TASKS

    data_dir = Path(data_dir).resolve()
    records = []
    for r in json.loads((data_dir / eval_file).read_text()):
        question, answers = TASKS[r["task"]]
        records.append({"id": r["id"], "subset": r["task"], "question": question, "choices": list(answers.values()),
                        "answer": r["answer"], "audio": str(data_dir / r["audio"])})
    out = data_dir / "mc" / Path(eval_file).with_suffix(".jsonl").name
    out.parent.mkdir(exist_ok=True)
    out.write_text("".join(json.dumps(x) + "\n" for x in records))
    return out


def evaluate_mc(model, data_dir: str | Path, out: str | Path, *, mode: str = "both", batch_size: int = 16,
                max_new_tokens: int = 64) -> dict:
    """``mufun-eval`` on :func:`multiple_choice`'s subsets with ``model`` (a model directory or a
    loaded ``mufun_jax.MuFun``); prints the accuracies read back from ``OUT/results.json``
    (generated with the regex extractor, and by likelihood) and returns that object."""
    from mufun_jax import MuFun
    from mufun_jax.evaluate import data as data_lib
    from mufun_jax.evaluate import run as run_lib

    mc = multiple_choice(data_dir)
    loaded = model if isinstance(model, MuFun) else (
        lambda: MuFun.from_pretrained(model, batch_size=batch_size, max_new_tokens=max_new_tokens))
    shown = "(loaded model)" if isinstance(model, MuFun) else model
    print(f"\n$ mufun-eval {shown} --data {mc} --out {out} --mode {mode}", flush=True)
    run_lib.evaluate([("demo", loaded)], data_lib.load_subsets(mc), out,
                     settings=run_lib.Settings(mode=mode, max_new_tokens=max_new_tokens, progress=False))
    results = json.loads((Path(out) / "results.json").read_text())
    m = results["models"]["demo"]
    for task, e in m["subsets"].items():
        ll = f", likelihood {e['likelihood_accuracy']:.0%}" if mode == "both" else ""
        print(f"multiple choice {task:<11} n={e['n']:<3d} generated {e['accuracy']:.0%}{ll}")
    ll = f", likelihood {m['likelihood_average']:.0%}" if mode == "both" else ""
    print(f"multiple choice average (mean of subsets): generated {m['average']:.0%}{ll}")
    return results


def _stage(config: Path, out: Path, overrides: list[str]) -> dict:
    """One ``train.py --config CONFIG KEY=VALUE ...`` run, in this process."""
    from mufun_jax.train_config import TrainConfig
    from mufun_jax.train_lib import train

    print(f"\n$ python train.py --config {config} {' '.join(overrides)}", flush=True)
    return train(TrainConfig.load(config, overrides))


def run(out: str | Path = "runs/demo", *, configs: str | Path = CONFIGS, n_train: int = 960, n_eval: int = 96,
        seed: int = 0, warmup_overrides: tuple = (), full_overrides: tuple = ()) -> dict[str, tuple[int, int]]:
    """The whole demo; prints a summary, writes ``OUT/report.png`` and returns the held-out accuracy
    per task. The overrides shorten it (the test suite runs a few steps of each stage)."""
    from mufun_jax.cli import setup_logging
    from mufun_jax.metrics import plot_runs

    setup_logging()
    out, configs = Path(out), Path(configs)
    if out.exists():
        shutil.rmtree(out)
    data = out / "data"
    paths = [f"data.dataset={data / 'train.json'}", f"data.eval_dataset={data / 'eval.json'}",
             f"data.tokenizer={data / 'tokenizer'}", f"seed={seed}", f"data.seed={seed}"]
    times, results = {}, {}
    t0 = time.perf_counter()
    prepare(data, n_train=n_train, n_eval=n_eval, seed=seed)
    times["prepare data"] = time.perf_counter() - t0
    for name, config, extra in (("warmup", "demo_warmup.yaml", list(warmup_overrides)),
                                ("full", "demo.yaml", [f"init_from={out / 'warmup' / 'model'}",
                                                       *full_overrides])):
        t0 = time.perf_counter()
        results[name] = _stage(configs / config, out / name, [f"output_dir={out / name}", *paths, *extra])
        times[f"{name} stage"] = time.perf_counter() - t0
    print(f"\n$ python -m mufun_jax.demo evaluate {out / 'full' / 'model'} {data}", flush=True)
    t0 = time.perf_counter()
    acc = evaluate(out / "full" / "model", data, out=out / "accuracy.json")
    times["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mc = evaluate_mc(out / "full" / "model", data, out / "eval", mode="both")["models"]["demo"]
    times["mufun-eval"] = time.perf_counter() - t0
    report = plot_runs([out / "warmup", out / "full"], out / "report.png", names=["warmup", "full"],
                       accuracy=acc, title="MuFun CPU demo: loss per stage, held-out accuracy per task")
    total = sum(times.values())
    print(f"\n== demo summary: {total / 60:.1f} min on this machine ==")
    for name, t in times.items():
        stage = results.get(name.split()[0], {})
        losses = (f"   final loss {stage['loss']:.3f}, eval loss {stage['eval_loss']:.3f}"
                  if "eval_loss" in stage else "")
        print(f"  {name:<14} {t:6.0f} s{losses}")
    print("  held-out accuracy: " + ", ".join(f"{t} {r}/{n} ({r / n:.0%})" for t, (r, n) in acc.items()))
    print(f"  multiple choice (mufun-eval, {out / 'eval' / 'results.json'}): average of the subsets "
          f"{mc['average']:.0%} generated, {mc['likelihood_average']:.0%} by likelihood; "
          + ", ".join(f"{t} {e['accuracy']:.0%}" for t, e in mc["subsets"].items()))
    print(f"  report: {report}")
    return acc


ONE_WORD = " Answer in one word."


def one_word_split(data_dir: Path, split: str) -> str:
    """``{split}.json`` with a new instruction the demo model never saw: the same clips and
    questions plus "Answer in one word.", answered by the class name ("sine", "high", "chord")."""
    from mufun_jax.data.synth import TASKS

    records = json.loads((data_dir / f"{split}.json").read_text())
    for r in records:
        label = next(k for k, v in TASKS[r["task"]][1].items() if v == r["answer"])
        r["conversations"] = [{"from": "human", "value": r["conversations"][0]["value"] + ONE_WORD},
                              {"from": "gpt", "value": label}]
        r["answer"] = label
    name = f"one_word_{split}.json"
    (data_dir / name).write_text(json.dumps(records))
    return name


def lora(out: str | Path = "runs/demo", *, configs: str | Path = CONFIGS, overrides: tuple = ()) -> dict:
    """The optional LoRA stage (configs/demo_lora.yaml) on a finished demo: QLoRA adapters teach the
    full model a new instruction ("Answer in one word."). Prints the held-out accuracy on it before
    (the demo model) and after, and returns both."""
    from mufun_jax.cli import setup_logging

    setup_logging()
    out, data = Path(out), Path(out) / "data"
    if not (out / "full" / "model").exists():
        raise FileNotFoundError(f"{out / 'full' / 'model'} is missing: run the demo first (make demo)")
    train_file, eval_file = one_word_split(data, "train"), one_word_split(data, "eval")
    print(f"\n$ python -m mufun_jax.demo evaluate {out / 'full' / 'model'} {data}  # on {eval_file}", flush=True)
    before = evaluate(out / "full" / "model", data, show=3, eval_file=eval_file)
    paths = [f"output_dir={out / 'lora'}", f"init_from={out / 'full' / 'model'}",
             f"data.dataset={data / train_file}", f"data.eval_dataset={data / eval_file}",
             f"data.tokenizer={data / 'tokenizer'}"]
    t0 = time.perf_counter()
    result = _stage(Path(configs) / "demo_lora.yaml", out / "lora", [*paths, *overrides])
    took = time.perf_counter() - t0
    print(f"\n$ python -m mufun_jax.demo evaluate {out / 'lora' / 'model'} {data}  # on {eval_file}", flush=True)
    after = evaluate(out / "lora" / "model", data, show=3, eval_file=eval_file)
    print(f"\n== LoRA stage: {took / 60:.1f} min, final loss {result['loss']:.3f}, eval loss "
          f"{result.get('eval_loss', float('nan')):.3f}; held-out accuracy on \"{ONE_WORD.strip()}\" ==")
    for task in after:
        (rb, n), (ra, _) = before[task], after[task]
        print(f"  {task:<11} before {rb}/{n} ({rb / n:.0%})  after {ra}/{n} ({ra / n:.0%})")
    return {"before": before, "after": after}


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m mufun_jax.demo", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="the whole demo (what make demo runs)")
    r.add_argument("--out", default="runs/demo")
    r.add_argument("--configs", default=str(CONFIGS), help="folder of demo_warmup.yaml and demo.yaml")
    r.add_argument("--seed", type=int, default=0, help="data and training seed")
    p = sub.add_parser("prepare", help="synthesise the dataset and build the tokenizer")
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=960)
    p.add_argument("--n-eval", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("evaluate", help="answer the held-out clips with a trained model and print the accuracy")
    e.add_argument("model", help="a model directory written by train.py (OUTPUT_DIR/model)")
    e.add_argument("data_dir")
    e.add_argument("--batch-size", type=int, default=16)
    mc = sub.add_parser("mc", help="score a trained model on the held-out clips as MuCUE-style multiple choice "
                                   "through mufun-eval (DIR/mc/eval.jsonl; results.json in --out)")
    mc.add_argument("model")
    mc.add_argument("data_dir")
    mc.add_argument("--out", default="runs/demo/mc")
    mc.add_argument("--mode", choices=("generate", "likelihood", "both"), default="both")
    lo = sub.add_parser("lora", help="after run: the optional QLoRA stage (configs/demo_lora.yaml): a new "
                                     "instruction, accuracy before and after")
    lo.add_argument("--out", default="runs/demo")
    lo.add_argument("--configs", default=str(CONFIGS))
    args = ap.parse_args(argv)
    enable_compile_cache()  # a second demo run skips most of its compiling (mufun_jax/compile_cache.py)
    if args.cmd == "lora":
        lora(args.out, configs=args.configs)
        return 0
    if args.cmd == "run":
        run(args.out, configs=args.configs, seed=args.seed)
        return 0
    if args.cmd == "mc":
        evaluate_mc(args.model, args.data_dir, args.out, mode=args.mode)
        return 0
    if args.cmd == "prepare":
        prepare(args.out_dir, n_train=args.n_train, n_eval=args.n_eval, seed=args.seed)
        return 0
    evaluate(args.model, args.data_dir, batch_size=args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
