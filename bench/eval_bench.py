#!/usr/bin/env python3
"""MuCUE-format evaluation throughput on CPU: ``mufun-eval``'s loop against MuCUE-Bench's way.

The bench config of bench/inference.py (``mufun-tiny`` with the 2-layer width-32 Whisper, random
weights, a small offline tokenizer; the same weights in JAX and in the torch reference). ``--items``
MuCUE-format items (default 200) over ``--items / --per-clip`` synthetic clips of 3-30 s (MuCUE
subsets ask several questions about a clip), each with four options, greedy, 64 new tokens.

  (a) mufun-eval   ``mufun_jax.evaluate.run.evaluate``: the protocol prompt, the batched engine
                   (each clip encoded once), regex extraction, answers.jsonl and the reports;
  (b) MuCUE-Bench  one reference ``chat()`` per item (WhisperFeatureExtractor, splice, HF
                   ``generate``), as ``eval_single.py`` calls ``model.chat`` with ``temperature=0``.

(a) is run once to compile, then timed on a fresh output directory. (b) is timed on the first
``--reference-items`` items (default 40; a rate, since it does one item at a time) and its answers
are compared with (a)'s. Usage: python bench/eval_bench.py [--items 200] [--reference-items 40]

Measured 2026-12-07 on the 2-core development VM, shared with other jobs (load average 15-20, so
both sides ran slowed down): (a) 200 items in 53.0 s = 3.78 items/s; (b) 40 items in 285.1 s =
0.14 items/s; 26.9x, with (a)'s raw answers equal to the reference chat()'s on 40/40 items. The
first (compiling) run of (a) on 16 items took 42.7 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np

QUESTIONS = ["What is the genre of this music?", "Which instrument plays the melody?", "What is the tempo?",
             "What mood does this clip convey?"]
OPTIONS = ["A. jazz B. rock C. piano D. drums", "A. piano B. guitar C. drums D. voice",
           "A. fast B. slow C. medium D. free", "A. happy B. sad C. bright D. dark"]


def make_items(workdir: Path, n: int, per_clip: int, seed: int = 0) -> list[dict]:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    items = []
    for c in range((n + per_clip - 1) // per_clip):
        secs = float(rng.uniform(3, 30))
        t = np.arange(int(secs * 16000)) / 16000
        x = 0.2 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(t.size)
        f = workdir / f"clip{c}.wav"
        sf.write(f, x.astype(np.float32), 16000, subtype="FLOAT")
        for q in range(per_clip):
            if len(items) < n:
                k = (c + q) % len(QUESTIONS)
                items.append({"question": QUESTIONS[k], "choices_text": OPTIONS[k], "correct_choice": "ABCD"[c % 4],
                              "audio": {"path": str(f), "bytes": None}, "time_seg": []})
    return items


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--per-clip", type=int, default=2)
    ap.add_argument("--reference-items", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)

    import jax
    import torch

    import mufun_jax
    from inference import Reference, build
    from mufun_jax.evaluate import data as data_lib
    from mufun_jax.evaluate import run as run_lib

    jax.config.update("jax_default_matmul_precision", "highest")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg, ref, model, tok, _ = build(tmp, "small")
        records = make_items(tmp, args.items, args.per_clip)
        sources = {"bench": data_lib.ListSource("bench", records)}
        api = mufun_jax.MuFun(model, tok, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
        settings = run_lib.Settings(max_new_tokens=args.max_new_tokens, progress=False)
        t0 = time.perf_counter()
        run_lib.evaluate([("ours", api)], {"bench": data_lib.ListSource("bench", records[:16])}, tmp / "warm",
                         settings=settings)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        ours = run_lib.evaluate([("ours", api)], sources, tmp / "run", settings=settings)["records"]
        t_ours = time.perf_counter() - t0

        reference = Reference(ref, tok, api.stop_ids, args.max_new_tokens)
        m = min(args.reference_items, len(records))
        reference.chat({"prompt": "warm up", "audio": records[0]["audio"]["path"]})
        t0 = time.perf_counter()
        theirs = [reference.chat({"prompt": data_lib.protocol_prompt(r["question"], r["choices_text"]),
                                  "audio": r["audio"]["path"]}) for r in records[:m]]
        t_ref = time.perf_counter() - t0
    same = sum(o["raw_response"] == t for o, t in zip(ours, theirs))
    ours_rate, ref_rate = len(records) / t_ours, m / t_ref
    print(f"\n{len(records)} items over {(len(records) + args.per_clip - 1) // args.per_clip} clips (3-30 s), "
          f"<= {args.max_new_tokens} new tokens, batch size {args.batch_size}; torch threads "
          f"{torch.get_num_threads()}, jax devices {jax.devices()}; first (compiling) run on 16 items {warm:.1f} s")
    print(f"raw answers equal to the reference chat(): {same}/{m}\n")
    print("| system | items | s | items/s | vs (b) |\n|---|---|---|---|---|")
    print(f"| (a) mufun-eval, batched engine | {len(records)} | {t_ours:.1f} | {ours_rate:.2f} | "
          f"{ours_rate / ref_rate:.2f}x |")
    print(f"| (b) MuCUE-Bench, one chat() per item | {m} | {t_ref:.1f} | {ref_rate:.2f} | 1.00x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
