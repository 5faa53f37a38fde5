"""Bad input to ``infer.py``, one table row per case: the command, the exit status, a fragment of
the message, and the files that must come out byte for byte unchanged (by sha256).

Every row calls :func:`mufun_jax.infer_cli.infer_main` in-process on one tiny model directory (random
weights, the LM head scaled so that greedy answers differ between songs and questions). The rows
cover what used to go wrong (a crash at the default flags, resume emptying a file that is not
ours or cutting a file at a bad middle line, error records never retried, a damaged model
directory named wrongly or ending in a traceback, an empty input) and what already worked, so it
keeps working.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mufun_jax.infer_cli import infer_main

SR = 16000
WORDS = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song clip note".split()
QUESTIONS = ["What genre is this?", "Is it fast?", "Describe it.", "Which instrument?", "Is it loud?", "Any vocals?"]
LM_HEAD = ("language_model", "lm_head", "kernel")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny converted model directory, six songs, and request files built from them."""
    from flax import nnx

    from mufun_jax.checkpoint import save_model
    from mufun_jax.config import WhisperConfig, preset
    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.models import MuFun

    d = tmp_path_factory.mktemp("cli_errors")
    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(200)] + QUESTIONS, d / "tok",
                          vocab_size=400)
    base = preset("mufun-tiny")
    cfg = base.replace(whisper=WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2,
                                             encoder_attention_heads=2, encoder_ffn_dim=64),
                       taps=(0, 1, 2), connector_type="blp_3i_2x",
                       qwen3=dataclasses.replace(base.qwen3, vocab_size=len(tok)))
    params = nnx.to_pure_dict(nnx.state(MuFun(cfg, rngs=nnx.Rngs(3))))
    node = params
    for k in LM_HEAD[:-1]:
        node = node[k]
    node[LM_HEAD[-1]] = np.asarray(node[LM_HEAD[-1]]) * 8.0  # greedy choices far from ties, and varied
    save_model(d / "model", cfg, params, tokenizer=tok)
    for s in range(6):
        t = np.arange(int((1.5 + 0.5 * s) * SR)) / SR
        x = 0.4 * np.sin(2 * np.pi * 110 * (s + 1) * t) * (1 + np.sin(2 * np.pi * (s + 1) * t))
        sf.write(d / f"song{s}.wav", (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32), SR, subtype="FLOAT")
    (d / "noise.wav").write_bytes(rng.bytes(4000))  # not audio
    return d


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def _requests(n_songs: int, n_questions: int, max_new_tokens: int | None = 6) -> list[dict]:
    out = []
    for s in range(n_songs):
        for q in range(n_questions):
            r = {"id": f"s{s}q{q}", "prompt": QUESTIONS[q], "audio": f"song{s}.wav"}
            if max_new_tokens is not None:
                r["max_new_tokens"] = max_new_tokens  # per request: the flags stay at their defaults
            out.append(r)
    return out


def _run(world, tmp, capsys, args) -> tuple[int, str]:
    capsys.readouterr()
    rc = infer_main([str(a) for a in args])
    return rc, capsys.readouterr().err


# -- case 1: the default flags on more requests than one prefill batch ---------------------------------


@pytest.mark.parametrize("sampled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["greedy", "sampled"])
def test_default_flags_answer_every_request_like_two_slots(world, tmp_path, capsys, sampled):
    """36 requests over 6 songs with no tuning flag (8 slots, prefill batches of 4): every id once,
    with the answers of a run with --batch-size 2. At 4fc1978 this raised AssertionError: 5.
    Greedy answers of a random tiny model differ little, so the same holds sampled at temperature
    1 with a seed per request (a request's seed, not its batch, drives its sampling): there,
    answers put under the wrong id cannot go unnoticed."""
    reqs = _requests(6, 6)
    if sampled:
        reqs = [dict(r, seed=i) for i, r in enumerate(reqs)]
    req = _write_jsonl(tmp_path / "req.jsonl", reqs)
    flags = ["--temperature", "1.0"] if sampled else []
    rc, err = _run(world, tmp_path, capsys, [world / "model", req, "-o", tmp_path / "default.jsonl", "--audio-root",
                                             world, "--no-progress", *flags])
    assert rc == 0, err
    rc, err = _run(world, tmp_path, capsys, [world / "model", req, "-o", tmp_path / "two.jsonl", "--audio-root",
                                             world, "--no-progress", "--batch-size", "2", *flags])
    assert rc == 0, err
    got, want = _read(tmp_path / "default.jsonl"), _read(tmp_path / "two.jsonl")
    ids = sorted(r["id"] for r in reqs)
    assert sorted(g["id"] for g in got) == ids and sorted(w["id"] for w in want) == ids  # each id exactly once
    assert {g["id"]: g["answer"] for g in got} == {w["id"]: w["answer"] for w in want}
    assert len({w["answer"] for w in want}) >= (30 if sampled else 2), "too few distinct answers to prove much"


def test_default_flags_on_three_batches_of_requests(world, tmp_path, capsys):
    """3 x the default --batch-size (24 requests), no flags but the output: all answered."""
    req = _write_jsonl(tmp_path / "req.jsonl", _requests(4, 6, max_new_tokens=3))
    rc, err = _run(world, tmp_path, capsys, [world / "model", req, "-o", tmp_path / "out.jsonl", "--audio-root",
                                             world])
    assert rc == 0, err
    assert sorted(g["id"] for g in _read(tmp_path / "out.jsonl")) == sorted(r["id"] for r in _requests(4, 6))


# -- the table --------------------------------------------------------------------------------------


def _damage(kind):
    def apply(model: Path):
        leaf = model / "params" / "state" / ".".join(LM_HEAD)
        if kind == "param_dir":
            shutil.rmtree(leaf)
        elif kind == "zarr_json":
            (leaf / "zarr.json").unlink()
        elif kind == "zarr_json_cut":
            (leaf / "zarr.json").write_text((leaf / "zarr.json").read_text()[:10])
        elif kind == "chunk_cut":
            chunk = sorted(p for p in (leaf / "c").rglob("*") if p.is_file())[0]
            chunk.write_bytes(chunk.read_bytes()[:5])
        elif kind == "config_cut":
            (model / "mufun_config.json").write_text((model / "mufun_config.json").read_text()[:40])
    return apply


OK_REC = {"id": "ok", "prompt": "What genre is this?", "audio": "song0.wav"}

# (name, requests (list, or raw text), extra args, prepare(tmp, world) -> model dir, rc, message fragment,
#  output check: None | "untouched" | "absent" | {id: error reason})
ROWS = [
    ("output_not_ours", [OK_REC], [], "markdown", 2, "does not look like infer.py's output", "untouched"),
    ("bad_middle_line", [OK_REC], [], "bad_middle", 2, "line 2: not JSON", "untouched"),
    ("not_a_record_line", [OK_REC], [], "not_record", 2, "not a result record", "untouched"),
    ("foreign_last_line", [OK_REC], [], "foreign_tail", 2, "is not a result record cut short", "untouched"),
    ("damaged_param_dir", [OK_REC], [], "param_dir", 2, "parameter language_model.lm_head.kernel is unreadable",
     "absent"),
    ("deleted_zarr_json", [OK_REC], [], "zarr_json", 2, "lm_head.kernel/zarr.json does not exist", "absent"),
    ("truncated_zarr_json", [OK_REC], [], "zarr_json_cut", 2, "lm_head.kernel/zarr.json is damaged", "absent"),
    ("truncated_chunk", [OK_REC], [], "chunk_cut", 2, "a data file under", "absent"),
    ("truncated_config", [OK_REC], [], "config_cut", 2, "mufun_config.json: not valid JSON", "absent"),
    ("missing_model_dir", [OK_REC], [], "no_model", 2, "no such directory", "absent"),
    ("empty_input", "", [], None, 2, "no requests in the file", "absent"),
    ("broken_json_list", '[{"id": 1, ', [], None, 2, "not a valid JSON list", "absent"),
    ("missing_input", None, [], None, 2, "cannot read requests", "absent"),
    ("duplicate_ids", [OK_REC, dict(OK_REC, prompt="Is it fast?")], [], None, 2, "duplicate request ids", "absent"),
    ("bad_output_dir", [OK_REC], [], "no_out_dir", 2, "no such directory for --output", "absent"),
    ("zero_batch_size", [OK_REC], ["--batch-size", "0"], None, 2, "--batch-size 0 must be >= 1", "absent"),
    ("zero_new_tokens", [OK_REC], ["--max-new-tokens", "0"], None, 2, "--max-new-tokens 0 must be >= 1", "absent"),
    ("bad_top_p", [OK_REC], ["--top-p", "0"], None, 2, "top_p", "absent"),
    ("negative_temperature", [OK_REC], ["--temperature", "-1"], None, 2, "temperature", "absent"),
    ("bad_shard", [OK_REC], ["--shard", "3/2"], None, 2, "--shard '3/2'", "absent"),
    ("malformed_line", [OK_REC, "{not json"], [], None, 1, "malformed_record 1",
     {"ok": None, "req.jsonl:2": "malformed_record"}),
    ("missing_audio", [OK_REC, {"id": "m", "prompt": "Hi?", "audio": "absent.wav"}], [], None, 1, "missing_file 1",
     {"ok": None, "m": "missing_file"}),
    ("undecodable_audio", [OK_REC, {"id": "u", "prompt": "Hi?", "audio": "noise.wav"}], [], None, 1, "failed:",
     {"ok": None, "u": "undecodable"}),
    ("tag_audio_mismatch", [OK_REC, {"id": "t", "prompt": "<audio> or <audio>?", "audio": "song1.wav"}], [], None, 1,
     "failed:", {"ok": None, "t": "audio_tag_mismatch"}),
    ("too_long_prompt", [OK_REC, {"id": "l", "prompt": "jazz " * 3000}], [], None, 1, "too_long 1",
     {"ok": None, "l": "too_long"}),
]


@pytest.mark.parametrize("name,requests,extra,prepare,rc,fragment,check", ROWS, ids=[r[0] for r in ROWS])
def test_infer_bad_input(world, tmp_path, capsys, name, requests, extra, prepare, rc, fragment, check):
    model, out = world / "model", tmp_path / "out.jsonl"
    req = tmp_path / "req.jsonl"
    if isinstance(requests, list):
        _write_jsonl(req, requests)
    elif isinstance(requests, str):
        req.write_text(requests)
    if prepare in ("param_dir", "zarr_json", "zarr_json_cut", "chunk_cut", "config_cut"):
        model = tmp_path / "model"
        shutil.copytree(world / "model", model)
        _damage(prepare)(model)
    elif prepare == "no_model":
        model = tmp_path / "no_such_model"
    elif prepare == "no_out_dir":
        out = tmp_path / "missing" / "out.jsonl"
    elif prepare == "markdown":
        out.write_text("# My notes\n\nNot results, but a user's file that -o happened to name.\n" * 400)
    elif prepare == "bad_middle":
        _write_jsonl(out, [{"id": "a", "answer": "x"}, "garbage in the middle", {"id": "b", "answer": "y"}])
    elif prepare == "not_record":
        _write_jsonl(out, [{"id": "a", "answer": "x"}, {"name": "an object, but no record"}])
    elif prepare == "foreign_tail":
        out.write_text(json.dumps({"id": "a", "answer": "x"}) + "\nsome other text")
    before = _sha(out)
    got_rc, err = _run(world, tmp_path, capsys, [model, req, "-o", out, "--audio-root", world, "--no-progress",
                                                 "--max-new-tokens", "4", *extra])
    assert got_rc == rc, err
    assert fragment in err, err
    if rc == 2:
        lines = err.strip().splitlines()
        assert "Traceback" not in err and lines[-1].startswith("infer.py: error: ") and all(
            line.startswith(("usage:", "      ", "infer.py: error")) for line in lines), err  # one line (+ usage)
    if check == "untouched":
        assert _sha(out) == before
    elif check == "absent":
        assert not out.exists()
    else:
        got = {r["id"]: r.get("error") for r in _read(out)}
        assert got == check


# -- resume -----------------------------------------------------------------------------------------


def test_resume_drops_only_a_cut_last_line_and_retries_errors(world, tmp_path, capsys):
    """A partial last line left by a kill is dropped; earlier error records (a wrong --audio-root)
    are answered again by default, and kept with --no-retry-errors."""
    req = _write_jsonl(tmp_path / "req.jsonl", _requests(2, 2))
    out = tmp_path / "out.jsonl"
    common = [world / "model", req, "-o", out, "--no-progress", "--max-new-tokens", "4"]
    rc, err = _run(world, tmp_path, capsys, [*common, "--audio-root", tmp_path])  # wrong root: every audio missing
    assert rc == 1 and "missing_file 4" in err, err
    rc, err = _run(world, tmp_path, capsys, [*common, "--audio-root", tmp_path, "--no-retry-errors"])
    assert rc == 0 and "4 of 4 requests already done" in err, err
    assert [r.get("error") for r in _read(out)] == ["missing_file"] * 4

    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:15])  # two error records, then a line cut short by a kill
    rc, err = _run(world, tmp_path, capsys, [*common, "--audio-root", world])
    assert rc == 0, err
    assert "answering the 2 earlier error records again" in err
    got = _read(out)
    assert sorted(g["id"] for g in got) == sorted(r["id"] for r in _requests(2, 2))  # each id exactly once
    assert all("answer" in g and "error" not in g for g in got)


# -- the audio cache, keyed by content ------------------------------------------------------------


@pytest.mark.slow  # cost in the quick tier's 10 minutes; the quick tier keeps a cheaper test of the same module
def test_one_song_under_two_paths_is_encoded_once(world, tmp_path, capsys):
    """The audio cache is keyed by the decoded samples: a copy of a song under another name is
    not encoded again (it was, when keys were paths), and infer.py reports what the caches reused.
    A request's own ``audio_id`` keys it instead: a different audio under the same id is taken for
    the first (the caller's promise), which is how the test sees that the id is used."""
    shutil.copy(world / "song0.wav", tmp_path / "copy.wav")
    reqs = [{"id": f"{name}{q}", "prompt": QUESTIONS[q], "audio": str(path)}
            for name, path in (("a", world / "song0.wav"), ("b", tmp_path / "copy.wav"), ("c", world / "song1.wav"))
            for q in range(3)]
    req = _write_jsonl(tmp_path / "req.jsonl", reqs)
    rc, err = _run(world, tmp_path, capsys, [world / "model", req, "-o", tmp_path / "out.jsonl", "--no-progress",
                                             "--max-new-tokens", "4"])
    assert rc == 0, err
    assert "caches: audio 7 of 9 reused (78%)" in err, err  # two distinct songs encoded, seven uses reused
    got = {r["id"]: r["answer"] for r in _read(tmp_path / "out.jsonl")}
    assert [got[f"a{q}"] for q in range(3)] == [got[f"b{q}"] for q in range(3)]

    import mufun_jax

    api = mufun_jax.MuFun.from_pretrained(world / "model", batch_size=4, max_new_tokens=4)
    own = api.generate([{"prompt": QUESTIONS[0], "audio": str(world / "song0.wav"), "audio_id": "x"},
                        {"prompt": QUESTIONS[0], "audio": str(world / "song1.wav"), "audio_id": "x"}])
    assert api.cache_stats()["audio"]["computed"] == 1
    assert own[0] == own[1] == got["a0"]
