"""Smoke test of bench/compare.py: the whole benchmark at its --tiny size, in a subprocess.

It checks the structure of the result (every row, both sides, finite positive numbers), not the
speed: --tiny --parallel timings mean nothing. Both sides' training losses must be finite and the
two inference engines must agree on the greedy answers (same weights, fp32), so a broken side fails here.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The whole benchmark (both sides, in subprocesses): `make test-all` only.
pytestmark = pytest.mark.slow

ROWS = {  # (row, metric) pairs that must be present with both sides
    ("training, full", "samples/s"), ("training, full", "label tokens/s"), ("training, full", "achieved GFLOP/s"),
    ("training, full", "process CPU s per sample"), ("training, full", "useful / computed FLOPs (padding)"),
    ("training, warmup recipe", "samples/s"), ("training, warmup recipe", "label tokens/s"),
    ("training, warmup recipe", "achieved GFLOP/s"), ("training, warmup recipe", "process CPU s per sample"),
    ("inference, 3 requests", "answers/s vs chat() loop"),
    ("inference, 3 requests", "answers/s vs HF batched generate"),
    ("tagging: 2 songs x 4 questions", "answers/s vs chat() loop"),
    ("tagging: 2 songs x 4 questions", "answers/s vs HF batched generate"),
    ("tagging: 2 songs x 4 questions", "generated tokens/s vs chat() loop"),
    ("peak RSS, full training", "MB"),
    ("input pipeline: decode + resample + log-mel", "chunks/s"),
    ("input pipeline: log-mel only (device vs WhisperFeatureExtractor)", "chunks/s"),
}


def test_compare_tiny(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "compare.py"), "--tiny", "--repeats", "1", "--parallel",
                           "--profile", "--out", str(tmp_path), "--timeout", "300"],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "results.md").read_text().count("\n| ") >= len(ROWS) + 2

    assert res["precisions"] == ["fp32", "bf16"]
    rows = {(r["row"], r["metric"], r["precision"]): r for r in res["rows"]}
    want = {k + (p,) for k in ROWS for p in ("fp32", "bf16")}
    assert want <= set(rows), sorted(want - set(rows))
    for key in want:
        r = rows[key]
        for side in ("ours", "reference"):
            st = r[side]
            assert len(st["values"]) == 1 and all(math.isfinite(v) and v > 0 for v in st["values"]), (key, side, st)
        assert math.isfinite(r["ratio"]) and r["ratio"] > 0, (key, r["ratio"])
    compile_rows = [r for r in res["rows"] if r["metric"].startswith("compile")]
    assert len(compile_rows) == 4 and all(r["ours"]["median"] > 0 for r in compile_rows)
    for target_row in (("training, full", "samples/s", "fp32"), ("inference, 3 requests", "answers/s vs chat() loop",
                                                                  "bf16")):
        assert "target_met" in rows[target_row]

    for p in res["precisions"]:
        for side in ("ours_train", "ref_train"):
            for mode in ("train_full", "train_warmup"):
                run = res["raw"][p][side][0][mode]
                assert run["samples"] == res["settings"]["train_samples"], (p, side, mode, run["samples"])
                assert math.isfinite(run["loss_first"]) and math.isfinite(run["loss_last"]), (p, side, mode)
                assert 0 < run["useful_flops"] <= run["computed_flops"], (p, side, mode)
        assert res["infer_meta"][p]["generated_tokens"] > 0
    # the two sides' bf16 losses differ from their fp32 losses: the precision reached both
    for side in ("ours_train", "ref_train"):
        fp32, bf16 = (res["raw"][p][side][0]["train_full"]["loss_first"] for p in ("fp32", "bf16"))
        assert fp32 != bf16, (side, fp32)
    meta = res["infer_meta"]["fp32"]  # greedy answers equal in fp32; bf16 rounding may flip a near tie
    assert meta["agree_with_chat"] == {"ours": meta["requests"], "ref_batched": meta["requests"]}, meta
    tag = res["inference_tagging"]["fp32"]
    assert set(res["inference_tagging"]) == {"fp32", "bf16"}
    assert tag["requests"] == 8 and tag["ratio_vs_chat_loop"] > 0 and tag["ratio_vs_hf_batched"] > 0
    assert tag["agree_with_chat"] == {"ours": 8, "ref_batched": 8}, tag  # greedy answers equal the chat() loop's
    assert tag["ours_stats"]["audio_encoded"] == 2 and tag["ours_stats"]["prefix_reused"] == 6  # once per song
    assert set(tag["time_split"]) == {"encode", "prefill", "decode", "host and other"}
    comps = res["profile"]["components"]  # every piece timed in each precision, on both sides
    assert sorted((c["component"], c["precision"]) for c in comps) == sorted(
        (k, p) for k in {c["component"] for c in comps} for p in ("fp32", "bf16")) and len(comps) == 8
    assert all(c["ours_s"]["median"] > 0 and c["ref_s"]["median"] > 0 for c in comps)
    for key in ("cpu_count", "loadavg_start", "loadavg_end"):
        assert key in res["machine"]
    for key in ("jax", "jax_backend", "torch", "torch_threads", "torch_parallel_info"):
        assert key in res["facts"], key
