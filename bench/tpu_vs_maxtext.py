"""TPU efficiency side by side with MaxText: both train steps compiled ahead of time on the same
topologies, with the same jax and libtpu, then compared per chip (memory, FLOPs per token, HBM
traffic, collective bytes, a roofline step time and the MFU bound it implies).

No TPU is needed: libtpu compiles for a described slice on this CPU host. ``make bench-tpu``
builds its own environment (.venv-tpu: ``maxtext[tpu]==0.2.5`` and this project, Python 3.12 like
.venv) and runs this script there. It cannot share .venv: maxtext[tpu] needs mpmath>=1.4.1, and
every sympy that the test extra's torch 2.13.0 accepts needs mpmath<1.4:

    make bench-tpu                                          # every case, writes bench/tpu_vs_maxtext.{json,md}
    .venv-tpu/bin/python bench/tpu_vs_maxtext.py --cases maxtext_v5p_3 llm_v5p_3
    .venv-tpu/bin/python bench/tpu_vs_maxtext.py --list

Sides: ``maxtext`` is MaxText's Qwen3-8B train step (``model_name=qwen3-8b``, its base.yml
otherwise); ``llm`` is ours on a text-only batch with the LLM fully trained (the same model and
work); ``mufun`` is the whole MuFun in the full stage (2 audio chunks per row). All: sequence 4096,
bf16 compute, fp32 weights and AdamW state, one micro-batch per step, pure FSDP.

Roofline step time per chip = max(compiled FLOPs / peak, HBM bytes / HBM bandwidth) + collective
bytes sent / (ICI bandwidth / 2): compute and memory overlap, collectives are counted as if they
did not overlap (so the MFU bound holds even then); the "ICI overlapped" column takes the max of
all three instead. MFU bound = model FLOPs / (step time x peak). Each case compiles in
its own process (a 64-chip 8B compile takes minutes and GBs of RAM).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEQ = 4096
# (side, topology, per-chip batch, remat policy); MaxText's policies and ours have different names
CASES = {}
# the last entry per slice: each side's largest full-remat batch by the memory slope of the others
for _topo, _short, _batches, _largest in (("v5p-128", "v5p", (3, 12, 24), ()),
                                           ("v6e-64", "v6e", (3, 6, 8), (("maxtext", 11), ("llm", 14)))):
    for _b in _batches:
        CASES[f"maxtext_{_short}_{_b}"] = ("maxtext", _topo, _b, "full")
        CASES[f"llm_{_short}_{_b}"] = ("llm", _topo, _b, "full")
    CASES[f"maxtext_{_short}_{_batches[0]}_minimal"] = ("maxtext", _topo, _batches[0], "minimal")
    CASES[f"llm_{_short}_{_batches[0]}_dots"] = ("llm", _topo, _batches[0], "dots")
    CASES[f"mufun_{_short}_{_batches[0]}"] = ("mufun", _topo, _batches[0], "full")
    for _side, _b in _largest:
        CASES[f"{_side}_{_short}_{_b}"] = (_side, _topo, _b, "full")
DEFAULT = list(CASES)


# -- one compile (runs in a child process) ----------------------------------------------------------


def _maxtext_compile(topology: str, per_chip: int, remat: str, out: dict) -> None:
    """MaxText's own train_compile entry point, with its compiled executable captured."""
    import maxtext
    from maxtext.trainers.pre_train import train_compile as tc

    from mufun_jax.aot.topology import get_topology

    base = Path(maxtext.__file__).parent / "configs" / "base.yml"
    argv = ["train_compile", str(base), f"compile_topology={topology}", "compile_topology_num_slices=1",
            "model_name=qwen3-8b", f"per_device_batch_size={per_chip}", f"max_target_length={SEQ}",
            f"remat_policy={remat}", f"base_output_directory={tempfile.gettempdir()}/maxtext_out", "run_name=aot"]
    out["command"] = "python -m maxtext.trainers.pre_train.train_compile " + " ".join(argv[1:])
    captured = {}
    original = tc.jit_and_compile

    def keep(*a, **k):
        captured["compiled"] = original(*a, **k)
        return captured["compiled"]

    tc.jit_and_compile = keep
    topo = get_topology(topology)
    t0 = time.perf_counter()
    try:
        tc.main(argv)
    except Exception as e:  # the compiler's out-of-memory refusal
        _refused(out, e)
        return
    finally:
        out["compile_s"] = time.perf_counter() - t0
    _measure(out, captured["compiled"], topo.chips)


def _ours_compile(side: str, topology: str, per_chip: int, remat: str, out: dict) -> None:
    from mufun_jax.aot.drivers import compile_train
    from mufun_jax.aot.topology import get_topology
    from mufun_jax.train_config import TrainConfig

    topo = get_topology(topology)
    rows = per_chip * topo.chips
    overrides = [f"data.batch_size={rows}", f"data.max_chunks={2 * rows}", "optim.grad_accum=1",
                 f"data.seq_len={SEQ}", f"remat_policy={remat}"]
    if side == "llm":
        overrides.append("trainable={whisper: frozen, connector: frozen, llm: full}")
    out["command"] = (f"python -m mufun_jax.aot train --config configs/mufun8b_full.yaml --topology {topology} "
                      + ("--text-only " if side == "llm" else "") + " ".join(f"'{o}'" for o in overrides))
    cfg = TrainConfig.load(ROOT / "configs" / "mufun8b_full.yaml", overrides)
    keep = {}
    r = compile_train(cfg, topo, keep=keep, text_only=side == "llm")
    out["compile_s"] = r.lower_s + r.compile_s
    if keep.get("compiled") is None:
        out.update(fits=False, peak_bytes=r.peak_bytes, detail=r.detail)
        return
    _measure(out, keep["compiled"], topo.chips)


def _refused(out: dict, e: Exception) -> None:
    from mufun_jax.aot.drivers import _oom_bytes

    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "hbm" not in msg.lower():
        raise e
    used = _oom_bytes(msg)
    out.update(fits=False, peak_bytes=used[0] if used else 0, detail=" ".join(msg.split())[:400])


def _measure(out: dict, compiled, chips: int) -> None:
    """Per chip: memory from memory_analysis(); FLOPs, HBM bytes and collectives from the HLO,
    loops multiplied out (mufun_jax.aot.hlo, the same counter for both sides)."""
    from mufun_jax.aot.hlo import hlo_flops

    text = compiled.as_text()
    Path(out["hlo"]).write_text(text)  # for reading the HLO behind a number
    m = compiled.memory_analysis()
    peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
            + m.generated_code_size_in_bytes)
    h = hlo_flops(text)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    out.update(fits=True, peak_bytes=int(peak), temp_bytes=int(m.temp_size_in_bytes),
               argument_bytes=int(m.argument_size_in_bytes), hlo_flops=h.flops, kernel_calls=h.custom_calls,
               unknown_trip_counts=h.unknown_trip_counts, hbm_access_bytes=h.hbm_bytes, link_bytes=h.link_bytes,
               collective_bytes=h.collective_bytes, cost_analysis_bytes=float(cost.get("bytes accessed", 0.0)))


def worker(side: str, topology: str, per_chip: int, remat: str, path: str) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    out = dict(side=side, topology=topology, per_chip=per_chip, remat=remat, seq=SEQ,
               hlo=str(Path(path).with_suffix(".hlo.txt")))
    if side == "maxtext":
        _maxtext_compile(topology, per_chip, remat, out)
    else:
        _ours_compile(side, topology, per_chip, remat, out)
    Path(path).write_text(json.dumps(out, indent=1))
    return 0


# -- the comparison ---------------------------------------------------------------------------------


def analyse(r: dict) -> dict:
    """Adds model FLOPs, kernel FLOPs, per-token figures and the roofline to one result."""
    from mufun_jax import flops
    from mufun_jax.aot.drivers import _kernel_attention_flops
    from mufun_jax.aot.topology import TPU_SPECS, TOPOLOGIES
    from mufun_jax.config import preset

    cfg = preset("mufun-8b")
    spec = TPU_SPECS[TOPOLOGIES[r["topology"]][0]]
    tokens = r["per_chip"] * SEQ  # per chip
    llm_only = r["side"] in ("maxtext", "llm")
    trainable = {"whisper": "frozen", "connector": "frozen", "llm": "full"} if llm_only else \
        {"whisper": "full", "connector": "full", "llm": "full"}
    chunks = 0 if llm_only else 2 * r["per_chip"]
    seqs = [SEQ] * r["per_chip"]
    r["usable_bytes"] = spec.usable_gib * 2**30
    r["model_flops"] = flops.train_flops(cfg, trainable, chunks, seqs)  # per chip
    if not r.get("fits"):
        return r
    # splash / flash attention runs in Pallas kernels that the HLO does not show: add it from the
    # model count, with the forward recomputed under remat (both sides use such kernels)
    kernel = _kernel_attention_flops(cfg, trainable, r["remat"], chunks, seqs) if r["kernel_calls"] else 0.0
    r["compiled_flops"] = r["hlo_flops"] + kernel
    r["compiled_flops_per_token"] = r["compiled_flops"] / tokens
    r["model_flops_per_token"] = r["model_flops"] / tokens
    compute = r["compiled_flops"] / (spec.bf16_tflops * 1e12)
    memory = r["hbm_access_bytes"] / (spec.hbm_gbs * 1e9)
    ici = r["link_bytes"] / (spec.ici_gbs / 2 * 1e9)
    r.update(compute_s=compute, memory_s=memory, ici_s=ici, step_s=max(compute, memory) + ici)
    r["mfu_bound"] = r["model_flops"] / (r["step_s"] * spec.bf16_tflops * 1e12)
    r["mfu_overlapped"] = r["model_flops"] / (max(compute, memory, ici) * spec.bf16_tflops * 1e12)
    r["tokens_per_s_chip"] = tokens / r["step_s"]
    return r


def largest_batch(results: list, side: str, topology: str, remat: str) -> str:
    """The largest per-chip batch compiled that fits, and the one a line through the fitting
    compiles' peaks predicts (peak grows linearly with the batch)."""
    rs = sorted((r for r in results if (r["side"], r["topology"], r["remat"]) == (side, topology, remat)),
                key=lambda r: r["per_chip"])
    fit = list({r["per_chip"]: r for r in rs if r.get("fits")}.values())  # one per batch size
    if not fit:
        return "none compiled fits"
    best = max(r["per_chip"] for r in fit)
    if len(fit) < 2:
        return f"{best}"
    a, b = fit[-2], fit[-1]
    slope = (b["peak_bytes"] - a["peak_bytes"]) / (b["per_chip"] - a["per_chip"])
    predicted = best + int((b["usable_bytes"] - b["peak_bytes"]) // slope) if slope > 0 else best
    first_no = next((r["per_chip"] for r in rs if not r.get("fits") and r["per_chip"] > best), None)
    if first_no is not None:
        predicted = min(predicted, first_no - 1)
    return f"{best} compiled ({predicted} by the memory slope, {slope / 2**30:.2f} GiB per row)"


def table(results: list) -> str:
    gib = lambda b: f"{b / 2**30:.2f}"
    head = ["case", "side", "slice", "batch/chip", "remat", "peak GiB", "temp GiB", "fits", "compiled GFLOP/token",
            "model GFLOP/token", "HBM GB/step", "collective GB/step", "compute ms", "HBM ms", "ICI ms", "step ms",
            "MFU bound", "MFU, ICI overlapped", "tokens/s/chip"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("fits"):
            coll = sum(r["collective_bytes"].values())
            cells = [r["case"], r["side"], r["topology"], r["per_chip"], r["remat"], gib(r["peak_bytes"]),
                     gib(r["temp_bytes"]), "yes", f"{r['compiled_flops_per_token'] / 1e9:.1f}",
                     f"{r['model_flops_per_token'] / 1e9:.1f}", f"{r['hbm_access_bytes'] / 1e9:.0f}",
                     f"{coll / 1e9:.1f}", f"{1e3 * r['compute_s']:.0f}", f"{1e3 * r['memory_s']:.0f}",
                     f"{1e3 * r['ici_s']:.0f}", f"{1e3 * r['step_s']:.0f}", f"{100 * r['mfu_bound']:.1f}%",
                     f"{100 * r['mfu_overlapped']:.1f}%", f"{r['tokens_per_s_chip']:,.0f}"]
        else:
            cells = [r["case"], r["side"], r["topology"], r["per_chip"], r["remat"],
                     f"> {gib(r['usable_bytes'])}" if not r.get("peak_bytes") else gib(r["peak_bytes"]), "-", "**no**",
                     *["-"] * 11]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    sides = sorted({(r["side"], r["topology"], r["remat"]) for r in results})
    lines.append("")
    for side, topo in sorted({(r["side"], r["topology"]) for r in results}):
        fit = [r for r in results if (r["side"], r["topology"]) == (side, topo) and r.get("fits")]
        if fit:
            b = max(fit, key=lambda r: r["mfu_bound"])
            lines.append(f"- best MFU bound, {side} on {topo}: {100 * b['mfu_bound']:.1f}% ({b['case']}: "
                         f"{b['per_chip']} rows per chip, remat {b['remat']}, {b['tokens_per_s_chip']:,.0f} "
                         f"tokens/s/chip)")
    for side, topo, remat in sides:
        lines.append(f"- largest per-chip batch, {side} on {topo}, remat {remat}: "
                     f"{largest_batch(results, side, topo, remat)}")
    return "\n".join(lines)


def versions() -> dict:
    import importlib.metadata as md

    v = {p: md.version(p) for p in ("jax", "jaxlib", "libtpu", "maxtext", "flax") if _installed(p)}
    return {**v, "python": platform.python_version()}


def _installed(name: str) -> bool:
    import importlib.metadata as md

    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=None, help=f"default: all ({len(DEFAULT)})")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--out", default=None, help="write tpu_vs_maxtext.{json,md} into this folder")
    ap.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "tpu_vs_maxtext"),
                    help="each case's JSON and log (a case already there is reused: delete it to recompile)")
    ap.add_argument("--worker", nargs=5, metavar=("SIDE", "TOPOLOGY", "PER_CHIP", "REMAT", "JSON"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, topo, b, remat, path = args.worker
        return worker(side, topo, int(b), remat, path)
    if args.list:
        for k, v in CASES.items():
            print(f"{k:24s} side={v[0]} topology={v[1]} batch/chip={v[2]} remat={v[3]}")
        return 0
    names = args.cases or DEFAULT
    bad = [n for n in names if n not in CASES]
    if bad:
        print(f"unknown case(s) {bad}; --list shows them", file=sys.stderr)
        return 2
    if not _installed("maxtext") and any(CASES[n][0] == "maxtext" for n in names):
        print("maxtext is not installed in this environment: run `make bench-tpu` (it builds .venv-tpu with "
              "maxtext[tpu]==0.2.5)", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for i, name in enumerate(names, 1):
        side, topo, b, remat = CASES[name]
        js = work / f"{name}.json"
        if not js.exists():
            t0 = time.time()
            with open(work / f"{name}.log", "w") as log:
                rc = subprocess.run([sys.executable, __file__, "--worker", side, topo, str(b), remat, str(js)],
                                    cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                    env={**os.environ, "JAX_PLATFORMS": "cpu"}).returncode
            status = "failed, see " + str(work / f"{name}.log") if rc or not js.exists() else "done"
            print(f"[{i}/{len(names)}] {name}: {status} in {time.time() - t0:.0f} s", flush=True)
            if rc or not js.exists():
                continue
        else:
            print(f"[{i}/{len(names)}] {name}: reused {js}", flush=True)
        results.append(analyse({"case": name, **json.loads(js.read_text())}))
    md_text = table(results)
    print(md_text)
    if args.out:
        meta = {"date": datetime.date.today().isoformat(), "versions": versions(),
                "command": " ".join([Path(sys.executable).name, *sys.argv])}
        out = Path(args.out)
        (out / "tpu_vs_maxtext.json").write_text(json.dumps({**meta, "results": results}, indent=1))
        (out / "tpu_vs_maxtext.md").write_text(
            f"# MuFun vs MaxText, TPU AOT ({meta['date']})\n\nVersions: "
            + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + f"\n\nCommand: `{meta['command']}`\n\n"
            + md_text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
