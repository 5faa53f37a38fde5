#!/usr/bin/env python3
"""One table, one run: this JAX implementation against the PyTorch reference, on the same model and data.

Both sides use the same small MuFun (``--tiny`` for a smoke-test size):

- Whisper encoder shaped like whisper-tiny (d_model 384, 4 layers, 6 heads, FFN 1536, 128 mel bins),
  taps (0, 2, 3, 4) (HF numbering; 4 is the last block after the final LayerNorm) and the
  ``blp_4i_2x`` connector, AvgPool stride 5 (300 audio tokens per 30 s chunk);
- a Qwen3 of 4 layers, width 512 (FFN 1536, 8 query / 4 KV heads of 64) and a 32k vocabulary
  (32,000: the real 151,936 would make the LM head 4/5 of every FLOP at this width);
- one synthetic dataset: clips of 5-120 s (1-4 chunks of 30 s) rendered with numpy, prompts of 40-80
  random tokens around one ``<audio>``, answers of 5-200 random tokens (labels on the answers).

Rows (each measured for both sides, with the ratio ours / reference):

1. full training: samples/s and label tokens/s in steady state, after warm-up and compile. Ours: our
   ``Trainer`` on ``pack_batches`` batches (packing on; rows x seq_len x max_chunks chosen by the
   analytic cost model below over a small grid, on this dataset's length mix). Reference: the
   reference's padding (right-padded batches of ``ref_batch`` samples, padded to the longest),
   ``Qwen3ForCausalLM(labels=...)`` loss, ``torch.optim.AdamW`` (fused), global-norm clipping, gradient
   accumulation, full fine-tuning, sdpa attention. Both include their host work per step (packing /
   WhisperFeatureExtractor and splicing). Our compile time is reported separately.
2. the warmup recipe: only the connector trains (reference: ``requires_grad=False`` on Whisper and the LLM).
3. inference, answers/s for 16 requests (one clip each, per-request answer caps of 5-200 tokens,
   greedy): ``mufun_jax.MuFun.generate`` against the reference ``chat()`` loop (one at a time, HF
   ``generate``) and against one HF batched ``generate`` (left-padded). The reference side is
   ``bench/inference.py``'s ``Reference`` (subclassed: token ids out, per-request caps, device placement).
4. peak RSS of each side during full training: each training side runs in its own child process,
   which reads ``ru_maxrss`` right after the full-training row.
5. input pipeline, 30 s chunks/s: decode + resample (soundfile + soxr, flac 44.1 kHz stereo) + log-mel,
   with ``WhisperFeatureExtractor`` on the host (reference) or our jitted ``audio.log_mel_spectrogram``
   on the device (ours).

Precision (``--precision``, default both on CPU): every row and component is measured in fp32 (both
sides fp32 throughout) and in bf16. At bf16 our side computes in bf16 with fp32 master weights in
training (as on TPU) and holds bf16 weights in inference; the reference trains under bf16 autocast
(HF Trainer's ``bf16=True``) and runs bf16 modules in inference and in the component profile. Each
row, component and tagging summary carries its ``precision``.

Method: the two training sides run alternately (``--repeats`` rounds, the order swapped every round),
each in a fresh child process (so peak RSS and compile time are per round). For inference and the input
pipeline each side has one long-lived child (ours compiles once), and the parent alternates the systems
round by round. No process ever holds both runtimes. Reported: median and min-max over rounds, and the
training rows' process CPU seconds per sample (less sensitive to other load than wall time).

FLOPs are counted analytically (per sample, no padding): 6 N per token for trained weights, 2 N for
frozen weights whose input needs no gradient (Whisper in the warmup recipe), 4 N for frozen weights that
gradients pass through (the LLM in the warmup recipe: forward + input gradients), attention score/value
products at 2 N each way (x3 with a backward pass), the LM head over every position (both sides compute
it there). Achieved FLOP/s = useful FLOPs / time; with ``--peak-tflops`` also MFU. ``--profile`` adds a
table of the pieces (encoder forward, encoder forward+backward, LLM layers forward+backward, LM head +
loss) timed on each side at equal shapes, which tells whether a gap is in the kernels or in the work
done (padding, recompute).

Our side's settings on CPU: fp32, remat ``dots_no_batch`` and at most 8 chunks per packed batch. Without
remat a 16-chunk step needs about 21 GB (XLA materialises Whisper's fp32 attention scores for every chunk
and layer). Whisper runs as one scan that collects its taps on the side, so remat covers every layer:
the compiled temp memory of the audio path's forward + backward at 8 chunks is 2.3 GiB with remat
"full" (6.8 GiB without), whatever the taps. (When the layers were scanned in pieces split at the
taps, the one-layer pieces lost their remat: 4.1 GiB for taps (0, 2, 3, 4) and 7.7 GiB for taps
(0, 1, 2, 3, 4) with remat "full".) On GPU: bf16 compute, up to 32 chunks per batch. The reference
(sdpa attention, which does not materialise the scores on CPU) needs neither.

The workloads live in bench/workloads/ (one module each: training, inference, tagging, components,
input pipeline; plus the settings, the synthetic data, the child processes and the report); this
script is the driver. ``mufun_jax`` must be importable: ``make bench``, or ``PYTHONPATH=.`` from the
repository root.

    python bench/compare.py                 # full settings, CPU, 3 rounds -> bench/results.{json,md}
    python bench/compare.py --tiny --repeats 1 --parallel --out /tmp/x   # smoke test (~40 s on 2 idle cores)
    python bench/compare.py --device gpu --peak-tflops 989       # GPU: bf16 compute both sides, MFU
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from workloads import children, components, inference, pipeline, report, settings, tagging, training
from workloads.settings import Settings

# task name -> its set-up in the child process, returning the ops the parent calls by name
CHILDREN = {"ours_train": training.ours_ops, "ref_train": training.ref_ops, "ours_infer": inference.ours_child,
            "ref_infer": inference.ref_child, "ours_prof": components.ours_child, "ref_prof": components.ref_child}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="a fast smoke-test configuration")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each side runs once per round")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s of the device, for MFU")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent), help="folder for results.json and results.md")
    ap.add_argument("--remat", default=None, help="our remat policy (default: dots_no_batch; tiny: none)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per child process answer")
    ap.add_argument("--profile", action="store_true",
                    help="also time the model's pieces (encoder, LLM layers, LM head + loss) on each side")
    ap.add_argument("--only-profile", action="store_true", help="run only the --profile part and print it")
    ap.add_argument("--only-inference", action="store_true", help="run only the inference rows (16 requests, "
                    "tagging, input pipeline) and update them in an existing results.json")
    ap.add_argument("--only-tagging", action="store_true", help="run only the tagging workload and update its rows "
                    "and inference_tagging in OUT/results.{json,md}")
    ap.add_argument("--parallel", action="store_true",
                    help="smoke tests only: run the training and the inference phases at the same time "
                         "(the timings are then not comparable)")
    ap.add_argument("--precision", default=None,
                    help="comma-separated, each of fp32 and bf16: every workload runs in each (default: fp32,bf16 "
                         "on CPU, bf16 on GPU)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child is not None:
        spec = json.loads(args.child)
        s = Settings.from_dict(spec["settings"])
        if s.device == "cpu":
            os.environ["JAX_PLATFORMS"] = "cpu"
        children.serve(CHILDREN[spec["task"]](s, spec["workdir"]))
        return 0

    s = settings.tiny_settings() if args.tiny else settings.full_settings()
    s.device = args.device
    if args.device == "gpu" and not args.tiny:  # bf16 and device memory: larger packed batches pay off
        s.pack_grid = [(r, t, c) for t in (2048, 3072, 4096) for r in (2, 4, 8, 16) for c in (8, 16, 24, 32)
                       if r * t <= 32768]
    if args.remat:
        s.remat = args.remat
    precisions = (args.precision or ("bf16" if args.device == "gpu" else "fp32,bf16")).split(",")
    if not precisions or any(p not in ("fp32", "bf16") for p in precisions) or len(set(precisions)) < len(precisions):
        ap.error(f"--precision {args.precision!r}: expected fp32, bf16 or fp32,bf16")
    facts = settings.machine_facts()
    print(f"compare: {'tiny' if args.tiny else 'full'} settings on {args.device}, {args.repeats} rounds; "
          f"{facts['cpu_count']} cores, load {facts['loadavg_start']}", file=sys.stderr, flush=True)
    if args.only_profile:
        for p in precisions:  # each piece: best of 3 calls
            print(components.markdown(components.run_profile(dataclasses.replace(s, precision=p), 1, args.timeout), s))
        return 0
    if args.only_tagging or args.only_inference:
        return _update_inference(s, args, facts, precisions)
    if args.parallel:
        from concurrent.futures import ThreadPoolExecutor

        children.CHILD_ENV.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # two children share the cores
    runs = {}
    for p in precisions:  # every workload in each precision, fp32 first
        sp = dataclasses.replace(s, precision=p)
        print(f"compare: precision {p}", file=sys.stderr, flush=True)
        if args.parallel:
            with ThreadPoolExecutor(2) as pool:
                f_train = pool.submit(training.run_training, sp, args.repeats, args.timeout)
                f_inf = pool.submit(inference.run_inference, sp, args.repeats, args.timeout)
                train, inf = f_train.result(), f_inf.result()
        else:
            train = training.run_training(sp, args.repeats, args.timeout)
            inf = inference.run_inference(sp, args.repeats, args.timeout)
        prof = components.run_profile(sp, 1, args.timeout) if args.profile else None  # each piece: best of 3 calls
        runs[p] = {"train": train, "inf": inf, "prof": prof,
                   "rows": [dict(r, precision=p) for r in report.build_rows(sp, train, inf, args.peak_tflops)]}
    facts["loadavg_end"] = list(os.getloadavg())
    first = runs[precisions[0]]["train"]
    res = {"mode": "tiny" if args.tiny else "full", "device": args.device, "repeats": args.repeats,
           "parallel": args.parallel, "precisions": precisions,
           "command": " ".join(["python bench/compare.py"] + list(sys.argv[1:] if argv is None else argv)),
           "date": time.strftime("%Y-%m-%d %H:%M"), "machine": facts,
           "facts": {**first["ref"][0]["facts"], **first["ours"][0]["facts"]},
           "settings": {k: v for k, v in dataclasses.asdict(s).items() if k != "precision"},
           "packing": first["ours"][0]["train_full"]["packing"],
           "rows": [r for p in precisions for r in runs[p]["rows"]],
           "infer_meta": {p: runs[p]["inf"]["infer_meta"] for p in precisions},
           "profile": None if not args.profile else {
               "chunks": components.PROF_CHUNKS, "tokens": components.PROF_TOKENS,
               "components": [c for p in precisions for c in runs[p]["prof"]["components"]]},
           "inference_tagging": {p: _tagging_summary(runs[p]["inf"]["tagging"]) for p in precisions},
           "raw": {p: {"ours_train": runs[p]["train"]["ours"], "ref_train": runs[p]["train"]["ref"],
                       "infer": runs[p]["inf"]} for p in precisions}}
    report.write(res, Path(args.out))
    return 0


def _tagging_summary(tag: dict) -> dict:
    return {**tagging.rows(tag)[1], "date": time.strftime("%Y-%m-%d %H:%M")}


def _update_inference(s: Settings, args, facts: dict, precisions: list[str]) -> int:
    """--only-tagging / --only-inference: measure the tagging workload (or every inference row:
    16 requests, tagging, input pipeline) in each precision and replace those rows in an existing
    results.json."""
    out = Path(args.out)
    old = out / "results.json"
    flag = "--only-tagging" if args.only_tagging else "--only-inference"
    if not old.exists():
        print(f"compare: {flag} updates {old}, which does not exist: run the whole comparison first",
              file=sys.stderr)
        return 2
    res = json.loads(old.read_text())
    if "precisions" not in res:
        print(f"compare: {old} predates --precision (one precision, no precision keys): run the whole comparison",
              file=sys.stderr)
        return 2
    for p in precisions:
        inf = inference.run_inference(dataclasses.replace(s, precision=p), args.repeats, args.timeout,
                                      tagging_only=args.only_tagging)
        if args.only_tagging:
            new_rows, replaced = tagging.rows(inf["tagging"])[0], ("tagging:",)
        else:
            new_rows = inference.rows(s, inf) + pipeline.rows(inf)
            replaced = ("tagging:", "inference,", "input pipeline")
            res["infer_meta"][p] = inf["infer_meta"]
        new_rows = [dict(r, precision=p) for r in new_rows]
        names = {r["row"] for r in new_rows}
        mine = [r for r in res["rows"] if r.get("precision") == p]
        kept = [r for r in mine if r["row"] not in names and not r["row"].startswith(replaced)]
        at = next((i for i, r in enumerate(kept) if r["row"].startswith("peak RSS")), len(kept))
        others = [r for r in res["rows"] if r.get("precision") != p]
        res["rows"] = others + kept[:at] + new_rows + kept[at:]
        res["inference_tagging"][p] = _tagging_summary(inf["tagging"])
        raw = res.setdefault("raw", {}).setdefault(p, {})
        raw["tagging" if args.only_tagging else "infer"] = inf["tagging"] if args.only_tagging else inf
    res["rows"].sort(key=lambda r: res["precisions"].index(r["precision"]) if r.get("precision") in res["precisions"]
                     else len(res["precisions"]))  # stable: each precision's rows keep their order
    command = " ".join(["python bench/compare.py"] + sys.argv[1:])
    # these rows may come from another machine than the rest of the table: say which
    machine = {**facts, "loadavg_end": list(os.getloadavg())}
    res["tagging_command"], res["tagging_machine"] = command, machine
    if not args.only_tagging:
        res["inference_command"], res["inference_machine"] = command, machine
    report.write(res, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
