"""The Python inference API (``mufun_jax.MuFun``) and ``infer.py``.

One tiny model (``mufun-tiny`` with a 2-layer width-32 Whisper, as in test_generate, and the
vocabulary of a small offline tokenizer) is written twice: as a PyTorch combined safetensors
directory and, through ``convert_weights`` import, as a converted directory. One module-scoped API
object (batch 4, buckets (64, 1024), every audio batch padded to 4 chunks) serves most tests, so the
suite compiles the audio generation path once.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf
import torch

import mufun_jax
from mufun_jax import audio
from mufun_jax.config import WhisperConfig, preset
from mufun_jax.data.templates import SYSTEM, tokenize_with_audio
from mufun_jax.generate import Request
from mufun_jax.testing.torch_reference import TorchMuFun

ROOT = Path(__file__).resolve().parents[1]
SR = audio.SAMPLE_RATE
MAX_NEW = 12
KW = dict(batch_size=4, max_new_tokens=MAX_NEW, buckets=(64, 1024), max_chunks=3, max_batch_chunks=4,
          chunk_buckets=(4,))
PROMPT = "What genre is this?"
WORDS = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song clip note".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, torch_threads):
    from safetensors.numpy import save_file

    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.weights import import_checkpoint

    d = tmp_path_factory.mktemp("api")
    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(200)], d / "tok", vocab_size=400)
    base = preset("mufun-tiny")
    cfg = base.replace(
        whisper=WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2,
                              encoder_ffn_dim=64),
        taps=(0, 1, 2), connector_type="blp_3i_2x", qwen3=dataclasses.replace(base.qwen3, vocab_size=len(tok)))
    ref = TorchMuFun(cfg, seed=3)
    with torch.no_grad():
        ref.language_model.lm_head.weight.mul_(4.0)  # greedy choices far from ties
    src = d / "torch"
    src.mkdir()
    save_file(ref.combined_state_dict(), str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(cfg.to_tinyllava()))
    for f in (d / "tok").iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    import_checkpoint(d / "conv", src, progress=False)

    noise = lambda s: (0.1 * rng.standard_normal(int(s * SR))).astype(np.float32)
    t = np.arange(int(40 * SR)) / SR
    long = (0.2 * np.sin(2 * np.pi * (220 + 5 * t) * t) + noise(40)).astype(np.float32)  # 40 s: 2 chunks
    sf.write(d / "a.wav", noise(3), SR, subtype="FLOAT")
    np.save(d / "b.npy", (0.3 * np.sin(2 * np.pi * 440 * t[:5 * SR])).astype(np.float32))
    sf.write(d / "long.wav", long, SR, subtype="FLOAT")
    sf.write(d / "cut.wav", long[5 * SR:int(12.5 * SR)], SR, subtype="FLOAT")

    api = mufun_jax.MuFun.from_pretrained(d / "conv", audio_root=d, **KW)
    return d, cfg, ref, tok, api


def details(api, prompt, audio_files=None, segs=None, **kw):
    r = api.generate([{"prompt": prompt, "audio": audio_files, "time": segs}], max_new_tokens=MAX_NEW,
                     return_details=True, **kw)[0]
    assert r.ok, r
    return r


def test_api_class_and_cheap_import():
    from mufun_jax import api, models

    assert mufun_jax.MuFun is api.MuFun and mufun_jax.MuFun is not models.MuFun
    code = "import sys, mufun_jax; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_converted_and_torch_dirs_give_the_same_model(setup):
    d, cfg, ref, tok, api = setup
    from flax import nnx

    other = mufun_jax.MuFun.from_pretrained(d / "torch", **KW)  # converted in memory from safetensors
    a = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(api.model)))[0]
    b = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(other.model)))[0])
    assert len(a) == len(b) == 40
    for k, v in a:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b[k]), err_msg=jax.tree_util.keystr(k))
    mine, theirs = details(api, PROMPT, str(d / "long.wav")), details(other, PROMPT, str(d / "long.wav"))
    assert mine.token_ids == theirs.token_ids and mine.text == theirs.text
    assert len(mine.token_ids) >= 3 and mine.text

    from jax.sharding import NamedSharding

    from mufun_jax.sharding import make_mesh

    meshed = mufun_jax.MuFun.from_pretrained(d / "conv", mesh=make_mesh(1, 1, 1), **KW)
    leaves = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(meshed.model)))[0]
    assert all(isinstance(v.sharding, NamedSharding) for _, v in leaves)
    for k, v in leaves:
        np.testing.assert_array_equal(np.asarray(v), np.asarray(b[k]), err_msg=jax.tree_util.keystr(k))

    bf16 = mufun_jax.MuFun.from_pretrained(d / "conv", dtype="bfloat16", **KW)
    assert {str(x.dtype) for x in jax.tree.leaves(nnx.state(bf16.model))} == {"bfloat16"}
    assert bf16.model.run.dtype == "bfloat16"
    with pytest.raises(Exception, match="neither a MuFun model directory"):
        mufun_jax.MuFun.from_pretrained(d / "tok")


def test_chat_matches_the_reference_chat(setup):
    """The tag goes first, the evaluation template wraps the prompt, the answer is the decoded new
    tokens only; HF ``generate`` on the torch reference with the same stop ids gives the same tokens."""
    d, cfg, ref, tok, api = setup
    assert api.stop_ids == [2, 0]  # <|im_end|>, then the tokenizer's eos <|endoftext|>
    answer = api.chat(PROMPT, str(d / "a.wav"), max_new_tokens=MAX_NEW)

    ids = tokenize_with_audio(SYSTEM + " USER: <audio>\n" + PROMPT + " ASSISTANT:", tok)
    chunks = audio.chunk(audio.load_audio(d / "a.wav"))
    out = api.generator.generate([Request(ids, [chunks])], max_new_tokens=MAX_NEW)[0]
    new = list(out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids)
    assert len(new) >= 3
    assert answer == tok.decode(new, skip_special_tokens=True).strip() != ""
    assert "ASSISTANT" not in answer and "USER" not in answer
    mine = details(api, PROMPT, str(d / "a.wav"))
    assert mine.token_ids == [int(t) for t in out.token_ids] and mine.text == answer
    np.testing.assert_allclose(mine.logprobs, out.logprobs, atol=1e-6)

    mel = np.asarray(jax.jit(audio.log_mel_spectrogram)(audio.pad_chunks(chunks)))
    with torch.no_grad():
        embeds, mask, _ = ref.splice([ids], [[torch.from_numpy(mel.copy())]], 4096)
        hf = ref.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW,
                                         do_sample=False, eos_token_id=api.stop_ids, pad_token_id=0)[0].tolist()
    assert hf == [int(t) for t in out.token_ids]
    assert tok.decode(hf, skip_special_tokens=True).strip() == answer

    # an explicit tag at the start is the same prompt; a tag elsewhere is a different one
    assert api.chat("<audio>\n" + PROMPT, str(d / "a.wav"), max_new_tokens=MAX_NEW) == answer
    moved = details(api, PROMPT + " <audio>", str(d / "a.wav"))
    assert not np.allclose(moved.logprobs[:3], mine.logprobs[:3])
    with pytest.raises(mufun_jax.api.RequestError, match="2 <audio> tags for 1 audios") as e:
        api.chat("<audio> and <audio>", str(d / "a.wav"), max_new_tokens=MAX_NEW)
    assert e.value.reason == "audio_tag_mismatch"
    with pytest.raises(mufun_jax.api.RequestError) as e:
        api.chat(PROMPT, str(d / "nope.wav"), max_new_tokens=MAX_NEW)
    assert e.value.reason == "missing_file"


def test_batched_generate_equals_one_chat_at_a_time(setup):
    d, cfg, ref, tok, api = setup
    requests = [
        {"prompt": PROMPT, "audio": "a.wav"},
        {"id": "c", "audio": "b.npy", "conversations": [{"from": "human", "value": "<audio>\nIs it fast?"},
                                                        {"from": "gpt", "value": "yes"}]},
        {"prompt": "Compare <audio> with <audio>.", "audio": ["a.wav", "long.wav"], "time": [None, [0, 12.5]]},
        "Tell me about jazz.",
        {"prompt": "Describe it.", "audio": "long.wav"},
        {"prompt": "Is it loud?", "audio": "b.npy", "time": [1.0, 3.0], "seed": 3},
    ]
    singles = [("What genre is this?", [d / "a.wav"], None), ("<audio>\nIs it fast?", d / "b.npy", None),
               ("Compare <audio> with <audio>.", [d / "a.wav", d / "long.wav"], [None, [0, 12.5]]),
               ("Tell me about jazz.", None, None), ("Describe it.", str(d / "long.wav"), None),
               ("Is it loud?", d / "b.npy", [1.0, 3.0])]
    api.window = 4  # two windows: the next one's audio decodes while the engine works; results in input order
    try:
        batched = api.generate(requests, max_new_tokens=MAX_NEW, return_details=True)
        stats = dict(api.generator.stats)
        texts = api.generate(requests, max_new_tokens=MAX_NEW)
        again = {k: v - stats.get(k, 0) for k, v in api.generator.stats.items()}
    finally:
        api.window = 8 * 4
    assert [r.id for r in batched] == [0, "c", 2, 3, 4, 5]
    assert texts == [r.text for r in batched]
    for i, (r, (prompt, files, segs)) in enumerate(zip(batched, singles)):
        one = details(api, prompt, files, segs)
        assert one.token_ids == r.token_ids, i
        np.testing.assert_allclose(one.logprobs, r.logprobs, atol=1e-5, err_msg=str(i))
        assert one.text == r.text
    assert len({tuple(r.token_ids) for r in batched}) == len(batched)  # the requests differ
    # sampling: a request's seed decides its tokens, wherever it lands
    sampled = api.generate(requests[:3], max_new_tokens=MAX_NEW, temperature=1.5, top_p=0.9, seed=7,
                           return_details=True)
    assert sampled[1].token_ids == details(api, *singles[1][:2], temperature=1.5, top_p=0.9, seed=7).token_ids
    assert sampled[0].token_ids != batched[0].token_ids
    assert api.generator.compiles["decode"] <= len(api.generator.spans)  # one decode program per cache span
    # asked again, every audio prompt's prefix (system prompt, USER:, the audio) comes from the cache:
    # no audio is encoded again and only the questions are prefilled
    assert again.get("audio_encoded", 0) == 0 and again.get("prefix_computed", 0) == 0
    assert again["prefix_reused"] == 5 and again["requests"] == 6


def test_segments_cut_the_audio(setup):
    d, *_, api = setup
    seg = details(api, PROMPT, str(d / "long.wav"), segs=[5, 12.5])
    cut = details(api, PROMPT, str(d / "cut.wav"))
    whole = details(api, PROMPT, str(d / "long.wav"))
    assert seg.token_ids == cut.token_ids
    np.testing.assert_allclose(seg.logprobs, cut.logprobs, atol=1e-5)
    assert not np.allclose(seg.logprobs[:3], whole.logprobs[:3])
    two = details(api, "<audio> then <audio>", [str(d / "a.wav"), str(d / "long.wav")], segs=[None, [5, 12.5]])
    two_cut = details(api, "<audio> then <audio>", [str(d / "a.wav"), str(d / "cut.wav")])
    assert two.token_ids == two_cut.token_ids
    bad = api.generate([{"prompt": PROMPT, "audio": "a.wav", "time": [60, 70]}], return_details=True)[0]
    assert bad.error == "segment_out_of_range"


def test_score_ranks_the_greedy_answer_first(setup):
    d, cfg, ref, tok, api = setup
    greedy = details(api, PROMPT, str(d / "a.wav"))
    own = greedy.token_ids[:-1] if greedy.finish_reason == "stop" else greedy.token_ids
    rng = np.random.default_rng(5)
    cands = [own, *[[int(x) for x in rng.integers(3, len(tok), len(own))] for _ in range(3)], "jazz rock",
             "slow piano song"]
    scores = api.score(PROMPT, cands, audio_files=str(d / "a.wav"))
    totals = [s.total for s in scores]
    assert int(np.argmax(totals)) == 0, totals
    np.testing.assert_allclose(scores[0].token_logprobs, greedy.logprobs[:len(own)], atol=1e-5)
    assert len(scores[4].token_logprobs) == len(tok(" jazz rock", add_special_tokens=False).input_ids)
    assert abs(scores[0].mean - scores[0].total / len(own)) < 1e-9


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_infer_cli_end_to_end(setup, tmp_path, capsys):
    """infer.py's main in this process (its exit status is the return value): answers, error records
    for the bad requests, exit status 1 and the summary on stderr."""
    from mufun_jax.cli import infer_main

    d, cfg, ref, tok, api = setup
    conv = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "an answer"}]
    lines = [json.dumps({"id": "r1", "audio": "a.wav", "conversations": conv("<audio>\n" + PROMPT)}),
             json.dumps({"id": "r2", "prompt": "Describe it.", "audio": "missing.wav"}),
             json.dumps({"id": "r3", "prompt": "Is it fast?", "audio": "b.npy", "time": [0.5, 4.0]}),
             "{not json",
             json.dumps({"id": "r4", "prompt": "Tell me about jazz."})]
    (tmp_path / "req.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    capsys.readouterr()
    rc = infer_main([str(d / "conv"), str(tmp_path / "req.jsonl"), "--output", str(out), "--audio-root", str(d),
                     "--batch-size", "4", "--prefill-batch", "2", "--max-new-tokens", str(MAX_NEW), "--no-progress",
                     "--sort"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "3 of 5 requests answered" in err and "missing_file 1" in err
    got = _jsonl(out)
    assert [g["id"] for g in got] == ["r1", "r2", "r3", "req.jsonl:4", "r4"]
    assert got[1]["error"] == "missing_file" and "missing.wav" in got[1]["message"]
    assert got[3]["error"] == "malformed_record"
    want = [api.chat(PROMPT, str(d / "a.wav"), max_new_tokens=MAX_NEW),
            api.chat("Is it fast?", str(d / "b.npy"), segs=[0.5, 4.0], max_new_tokens=MAX_NEW),
            api.chat("Tell me about jazz.", max_new_tokens=MAX_NEW)]
    assert [got[i]["answer"] for i in (0, 2, 4)] == want
    assert all(got[i]["finish_reason"] in ("stop", "length") for i in (0, 2, 4))
    assert sorted(os.listdir(tmp_path)) == ["out.jsonl", "req.jsonl"]  # no temporary file left


def test_infer_cli_score_mode_and_usage_errors(setup, tmp_path, capsys):
    from mufun_jax.cli import infer_main

    d, cfg, ref, tok, api = setup
    cands = ["jazz", "rock piano", "slow"]
    records = [{"id": "q1", "audio": "a.wav", "conversations": [{"from": "human", "value": "<audio>\nWhich genre?"},
                                                                {"from": "gpt", "value": "jazz"}], "candidates": cands},
               {"id": "q2", "prompt": "Which tempo?", "audio": "b.npy", "candidates": ["fast", "slow tempo"]}]
    (tmp_path / "req.json").write_text(json.dumps(records))
    out = tmp_path / "scores.jsonl"
    argv = [str(d / "conv"), str(tmp_path / "req.json"), "--output", str(out), "--audio-root", str(d), "--score",
            "--batch-size", "4", "--no-progress"]
    assert infer_main(argv) == 0
    got = _jsonl(out)
    assert [g["id"] for g in got] == ["q1", "q2"]
    for g, rec in zip(got, records):
        want = api.score(rec["conversations"][0]["value"] if "conversations" in rec else rec["prompt"],
                         rec["candidates"], audio_files=str(d / rec["audio"]))
        assert [s["candidate"] for s in g["scores"]] == rec["candidates"]
        np.testing.assert_allclose([s["total"] for s in g["scores"]], [w.total for w in want], atol=1e-4)
        best = int(np.argmax([w.total for w in want]))
        assert g["answer_index"] == best and g["answer"] == rec["candidates"][best]
        assert all(len(s["token_logprobs"]) >= 1 for s in g["scores"])

    (tmp_path / "nocand.jsonl").write_text(json.dumps({"id": "x", "prompt": "hi"}) + "\n")
    out2 = tmp_path / "nocand_out.jsonl"
    assert infer_main([str(d / "conv"), str(tmp_path / "nocand.jsonl"), "--output", str(out2), "--score",
                       "--no-progress"]) == 1
    assert _jsonl(out2) == [{"id": "x", "error": "no_candidates", "message": _jsonl(out2)[0]["message"]}]
    fresh = str(tmp_path / "fresh.jsonl")
    assert infer_main([str(d / "conv"), str(tmp_path / "req.json"), "--output", fresh, "--top-p", "0"]) == 2
    assert infer_main([str(d / "conv"), str(tmp_path / "absent.jsonl"), "--output", fresh]) == 2
    assert infer_main([str(tmp_path), str(tmp_path / "req.json"), "--output", fresh]) == 2  # not a model
    capsys.readouterr()
    assert infer_main([str(d / "conv"), str(tmp_path / "req.json"), "--output", fresh, "--prefill-chunk", "100"]) == 2
    assert "prefill_chunk=100 must divide" in capsys.readouterr().err
    (tmp_path / "dup.json").write_text(json.dumps([{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                   {"id": "a", "prompt": "z"}]))
    assert infer_main([str(d / "conv"), str(tmp_path / "dup.json"), "--output", fresh]) == 2  # before any work
    assert not Path(fresh).exists()
    with pytest.raises(SystemExit) as e:
        infer_main([str(d / "conv")])
    assert e.value.code == 2


def _infer(args, **kw):
    return subprocess.Popen([sys.executable, "infer.py", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}, **kw)


def _stream_requests(d, tmp_path):
    """Twelve requests over three audios, the shared infer.py arguments, and an uninterrupted run's
    results by id (infer.py's main in this process)."""
    from mufun_jax.cli import infer_main

    audios = ["a.wav", "b.npy", "long.wav"]
    reqs = [{"id": f"q{i}", "prompt": p, "audio": audios[i % 3]} for i, p in enumerate(
        ["What genre is this?", "Is it fast?", "Describe it.", "Which instrument?", "Is it loud?", "Any vocals?"] * 2)]
    (tmp_path / "req.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs))
    common = [d / "conv", tmp_path / "req.jsonl", "--audio-root", d, "--batch-size", "2", "--max-new-tokens",
              str(MAX_NEW), "--no-progress"]
    clean = tmp_path / "clean.jsonl"
    assert infer_main([str(a) for a in (*common, "--output", clean)]) == 0
    want = {r["id"]: r for r in _jsonl(clean)}
    assert sorted(want) == sorted(r["id"] for r in reqs)
    return reqs, common, want


@pytest.mark.slow
def test_infer_cli_streams_and_resumes_after_sigkill(setup, tmp_path):
    """Results stream to the file as they complete; an infer.py process killed with SIGKILL and
    started again (with a truncated last line left behind) ends with every id exactly once and the
    content of an uninterrupted run."""
    import signal
    import time

    d, cfg, ref, tok, api = setup
    reqs, common, want = _stream_requests(d, tmp_path)
    out = tmp_path / "out.jsonl"
    p = _infer([*common, "--output", out])
    deadline = time.time() + 300
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    partial = _jsonl(out)
    assert 3 <= len(partial) < len(reqs), len(partial)  # killed mid-way, with results already on disk
    with open(out, "a") as f:
        f.write('{"id": "q11", "answer": "cut sh')  # a line cut short by the kill
    r = _infer([*common, "--output", out])
    _, err = r.communicate(timeout=300)
    assert r.returncode == 0, err
    assert f"{len(partial)} of {len(reqs)} requests already done" in err
    got = _jsonl(out)
    assert sorted(g["id"] for g in got) == sorted(want)  # every id exactly once
    assert {g["id"]: g for g in got} == want  # the same content as an uninterrupted run


@pytest.mark.slow  # four infer runs; test_cli_errors and test_eval keep shards/resume in the quick tier
def test_infer_cli_shards_merge_to_an_uninterrupted_run(setup, tmp_path):
    """--shard I/N splits the work into disjoint files that merge to an uninterrupted run's results
    (infer.py's main in this process: no process boundary is tested here)."""
    from mufun_jax.cli import infer_main
    from mufun_jax.outputs import merge_shards

    d, cfg, ref, tok, api = setup
    reqs, common, want = _stream_requests(d, tmp_path)
    for i in range(3):
        assert infer_main([str(a) for a in (*common, "--output", tmp_path / "sh.jsonl", "--shard", f"{i}/3")]) == 0
    shards = sorted(tmp_path.glob("sh.shard-*-of-3.jsonl"))
    ids = [[g["id"] for g in _jsonl(s)] for s in shards]
    assert len(shards) == 3 and all(ids) and sum(map(len, ids)) == len(reqs)
    assert merge_shards(shards, [q["id"] for q in reqs], tmp_path / "merged.jsonl") == len(reqs)
    assert _jsonl(tmp_path / "merged.jsonl") == [want[q["id"]] for q in reqs]
