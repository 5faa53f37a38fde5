"""``make demo-grpo``: GRPO on the CPU demo (``python -m mufun_jax.grpo.demo [--out runs/demo]``).

1. The demo's data and warmup stage (reused from ``make demo`` when present).
2. The demo's full stage shortened (``--sft-steps``, default 160 of 240), so that the model is
   still weak: its weakest task (instrument, at chance) is the one GRPO works on.
3. ``configs/demo_grpo.yaml``: G sampled answers per clip of that task, the ``exact_match`` reward
   (the held-out metric itself: a reward that differs from it gets gamed, as the extractor's
   bare-letter rule was), the GRPO loss.
4. Greedy held-out accuracy before and after (the demo's exact-match scoring), the line
   ``GRPO held-out accuracy: before X% -> after Y%``, and ``OUT/report_grpo.png`` with the reward
   and held-out accuracy curves.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mufun_jax.compile_cache import enable_compile_cache
from mufun_jax.demo import CONFIGS, _stage, evaluate, prepare


def plot(run: Path, out: Path, task: str) -> Path:
    """Mean reward per step (train rollouts) and greedy held-out accuracy (eval rewards)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["reward"]) for r in rows if "reward" in r]
    held = [(r["step"], 100 * r["eval/reward"]) for r in rows if "eval/reward" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    a.plot(*zip(*train), lw=1)
    a.set(xlabel="GRPO step", ylabel="mean reward (G samples per clip)", title=f"rollout reward ({task})")
    b.plot(*zip(*held), "o-")
    b.set(xlabel="GRPO step", ylabel="held-out accuracy (%)", title=f"greedy held-out accuracy ({task})", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(out: str | Path = "runs/demo", *, configs: str | Path = CONFIGS, sft_steps: int = 160,
        overrides: tuple = ()) -> dict:
    from mufun_jax.cli import setup_logging
    from mufun_jax.grpo.trainer import train
    from mufun_jax.train_config import TrainConfig

    setup_logging()
    out, configs = Path(out), Path(configs)
    data = out / "data"
    paths = [f"data.dataset={data / 'train.json'}", f"data.eval_dataset={data / 'eval.json'}",
             f"data.tokenizer={data / 'tokenizer'}"]
    t0 = time.perf_counter()
    if not (data / "train.json").exists():
        prepare(data)
    if not (out / "warmup" / "model").exists():
        _stage(configs / "demo_warmup.yaml", out / "warmup", [f"output_dir={out / 'warmup'}", *paths])
    sft = out / f"sft{sft_steps}"
    if not (sft / "model").exists():
        _stage(configs / "demo.yaml", sft, [f"output_dir={sft}", f"init_from={out / 'warmup' / 'model'}", *paths,
                                            f"max_steps={sft_steps}", f"save_every={sft_steps}", "eval_every=0"])
    t_sft = time.perf_counter() - t0
    print(f"\n$ python -m mufun_jax.demo evaluate {sft / 'model'} {data}", flush=True)
    before = evaluate(sft / "model", data, show=0)
    task = min(before, key=lambda t: (before[t][0] / before[t][1], t))
    print(f"weakest task after {sft_steps} SFT steps: {task} ({before[task][0]}/{before[task][1]})")
    grpo_dir = out / "grpo"
    args = [f"output_dir={grpo_dir}", f"init_from={sft / 'model'}", *paths,
            f"grpo.tasks=[{task}]", *overrides]
    print(f"\n$ python train.py --config {configs / 'demo_grpo.yaml'} {' '.join(args)}", flush=True)
    if grpo_dir.exists():
        import shutil

        shutil.rmtree(grpo_dir)
    t1 = time.perf_counter()
    result = train(TrainConfig.load(configs / "demo_grpo.yaml", args))
    took = time.perf_counter() - t1
    print(f"\n$ python -m mufun_jax.demo evaluate {grpo_dir / 'model'} {data}", flush=True)
    after = evaluate(grpo_dir / "model", data, show=0)
    report = plot(grpo_dir, out / "report_grpo.png", task)
    (rb, n), (ra, _) = before[task], after[task]
    print(f"\n== GRPO on the demo: SFT stopped at {sft_steps} steps ({t_sft / 60:.1f} min incl. data and warmup), "
          f"GRPO {result['step']} steps in {took / 60:.1f} min ==")
    for t in after:
        print(f"  {t:<11} before {before[t][0]}/{before[t][1]} ({before[t][0] / before[t][1]:.0%})  after "
              f"{after[t][0]}/{after[t][1]} ({after[t][0] / after[t][1]:.0%})" + ("   <- GRPO task" if t == task else ""))
    print(f"  report: {report}")
    print(f"GRPO held-out accuracy: before {rb / n:.0%} -> after {ra / n:.0%}")
    return {"task": task, "before": before, "after": after, "minutes": took / 60}


def main(argv=None) -> int:
    from mufun_jax.cli import ArgumentParser

    ap = ArgumentParser(prog="python -m mufun_jax.grpo.demo", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--configs", default=str(CONFIGS))
    ap.add_argument("--sft-steps", type=int, default=160, help="where the demo's full stage stops (of 240)")
    args = ap.parse_args(argv)
    enable_compile_cache()
    run(args.out, configs=args.configs, sft_steps=args.sft_steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
