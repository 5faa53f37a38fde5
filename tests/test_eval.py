"""``mufun-eval``: MuCUE-protocol multiple choice on a tiny random model against the torch reference.

One tiny model (as in test_api: ``mufun-tiny`` with a 2-layer width-32 Whisper and a small offline
tokenizer) is written as a PyTorch directory and converted; one module-scoped API object serves
the in-process runs, so the generation path compiles once. The MuCUE layout is written locally
(``DatasetDict.save_to_disk`` with undecoded ``audio`` {path, bytes}, and parquet); nothing is
downloaded.
"""

import dataclasses
import functools
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
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
from mufun_jax.evaluate import data as data_lib
from mufun_jax.evaluate import run as run_lib
from mufun_jax.evaluate.cli import main
from mufun_jax.evaluate.extract import OpenAIExtractor, regex_extract
from mufun_jax.evaluate.scoring import mcnemar_exact, summarize, wilson, write_reports
from mufun_jax.testing.torch_reference import TorchMuFun

ROOT = Path(__file__).resolve().parents[1]
SR = audio.SAMPLE_RATE
MAX_NEW = 16
KW = dict(batch_size=4, max_new_tokens=MAX_NEW, buckets=(64, 1024), max_chunks=3, max_batch_chunks=4,
          chunk_buckets=(4,))
WORDS = ("genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song clip note "
         "Choose the correct option for question based on audio A. B. C. D. What which key is").split()
OPTS = ["A. jazz B. rock C. piano D. drums", "A. fast B. slow", "A. happy B. sad C. loud"]


def _sf_bytes(x, fmt):
    import io

    b = io.BytesIO()
    sf.write(b, x, SR, format=fmt, subtype="FLOAT" if fmt == "WAV" else "PCM_16")
    return b.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, torch_threads):
    import datasets
    from safetensors.numpy import save_file

    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.weights import import_checkpoint

    d = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(WORDS, 8)) for _ in range(300)], d / "tok", vocab_size=400)
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

    t = np.arange(int(20 * SR)) / SR
    clips = {"a.wav": (0.1 * rng.standard_normal(3 * SR)).astype(np.float32),
             "b.flac": (0.3 * np.sin(2 * np.pi * 440 * t[:2 * SR])).astype(np.float32),
             "long.wav": (0.2 * np.sin(2 * np.pi * (220 + 5 * t) * t) + 0.05 * rng.standard_normal(len(t))
                          ).astype(np.float32)}
    files = {}
    for name, x in clips.items():
        files[name] = _sf_bytes(x, "FLAC" if name.endswith(".flac") else "WAV")
        (d / "clips").mkdir(exist_ok=True)
        (d / "clips" / name).write_bytes(files[name])  # what the reference reads: the same bytes as a file

    def rec(q, opts, correct, clip, seg=(), path=None):
        return {"question": q, "choices_text": opts, "correct_choice": correct,
                "audio": {"path": path, "bytes": files[clip]}, "time_seg": list(seg), "clip": clip}

    subsets = {
        "Genre": [rec("What genre is this?", OPTS[0], "A", "a.wav", path="a.wav"),
                  rec("Which genre is this song?", OPTS[0], "B", "long.wav", (5.0, 12.5), path="long.wav"),
                  rec("What is the tempo?", OPTS[1], "B", "a.wav", path="a.wav")],
        "Mood": [rec("Is it happy or sad?", OPTS[2], "C", "b.flac"),
                 rec("What mood is this clip?", OPTS[2], "A", "long.wav", (0, 4.0)),
                 rec("What mood?", OPTS[2], "E", "a.wav"),  # correct_choice not among the options
                 {**rec("x", OPTS[2], "A", "a.wav"), "question": None},  # a missing field
                 {**rec("Is it loud?", OPTS[2], "A", "a.wav"), "audio": {"path": "junk.wav", "bytes": b"RIFF??junk"}}],
    }
    for s in subsets.values():
        for r in s:
            if r["audio"]["path"] is None:
                r["audio"]["path"] = None
    dd = datasets.DatasetDict({k: datasets.Dataset.from_list([{k2: v for k2, v in r.items() if k2 != "clip"}
                                                             for r in v]).cast_column(
        "audio", datasets.Audio(decode=False)) for k, v in subsets.items()})
    dd.save_to_disk(str(d / "mucue"))
    api = mufun_jax.MuFun.from_pretrained(d / "conv", **KW)
    return d, cfg, ref, tok, api, subsets


def settings(**kw):
    return run_lib.Settings(max_new_tokens=MAX_NEW, progress=False, **kw)


_LOG_MEL = jax.jit(audio.log_mel_spectrogram)


@functools.lru_cache(maxsize=None)
def _mel_cached(path, seg):
    chunks = audio.chunk(audio.load_audio(path, None if seg is None else list(seg)))
    return np.asarray(_LOG_MEL(audio.pad_chunks(chunks)))


def _mel(path, seg):
    return torch.from_numpy(_mel_cached(str(path), None if seg is None else tuple(seg)).copy())


def torch_chat(ref, tok, stop_ids, prompt, path, seg):
    """The reference ``chat()``: the tag first, the evaluation template, greedy HF generate."""
    ids = tokenize_with_audio(SYSTEM + " USER: <audio>\n" + prompt + " ASSISTANT:", tok)
    with torch.no_grad():
        embeds, mask, _ = ref.splice([ids], [[_mel(path, seg)]], 4096)
        out = ref.language_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW,
                                          do_sample=False, eos_token_id=stop_ids, pad_token_id=0)[0].tolist()
    if out and out[-1] in stop_ids:
        out = out[:-1]
    return tok.decode(out, skip_special_tokens=True).strip()


def torch_logliks(ref, tok, prompt, options, path, seg):
    """Sum of the reference's log-probabilities of each option after the chat prompt (one forward
    pass over the options as rows; right padding does not change a causal model's earlier logits)."""
    text = SYSTEM + " USER: <audio>\n" + prompt + " ASSISTANT:"
    p_ids = tokenize_with_audio(text, tok)
    fulls = [tokenize_with_audio(text + " " + o, tok) for o in options]
    assert all(f[:len(p_ids)] == p_ids for f in fulls)
    with torch.no_grad():
        logits, mask = ref(fulls, [[_mel(path, seg)]] * len(fulls))
    out = []
    for row, full in enumerate(fulls):
        logp = torch.log_softmax(logits[row].double(), -1)
        n, T = len(full) - len(p_ids), int(mask[row].sum())
        out.append(float(sum(logp[T - n - 1 + k, full[len(p_ids) + k]] for k in range(n))))
    return out


@pytest.fixture(scope="module")
def ref_cached(setup):
    """The reference with each distinct mel encoded once (the encoder is the slow part on CPU)."""
    ref = setup[2]
    plain, cache = ref.encode_images, {}

    def encode_images(mel):
        key = (tuple(mel.shape), mel.numpy().tobytes())
        if key not in cache:
            cache[key] = plain(mel)
        return cache[key]

    ref.encode_images = encode_images
    yield ref
    del ref.encode_images


@pytest.fixture(scope="module")
def both_run(setup, tmp_path_factory):
    d, *_, api, _ = setup
    out = tmp_path_factory.mktemp("both")
    res = run_lib.evaluate([("tiny", api)], data_lib.load_subsets(d / "mucue"), out,
                           settings=settings(mode="both", data_root=d / "mucue"))
    return out, res


def test_raw_responses_equal_the_reference_chat_and_likelihood_its_argmax(setup, both_run, ref_cached):
    d, cfg, _, tok, api, subsets = setup
    ref = ref_cached
    out, res = both_run
    recs = {r["id"]: r for r in res["records"]}
    assert len(recs) == 8
    checked = 0
    for name, items in subsets.items():
        for i, r in enumerate(items):
            got = recs[f"{name}/{i}"]
            if got.get("error"):
                continue
            seg = r["time_seg"] or None
            prompt = ("Choose the correct option for the question based on the audio. " + r["question"] + " "
                      + r["choices_text"])
            assert got["prompt"] == prompt
            want = torch_chat(ref, tok, api.stop_ids, prompt, d / "clips" / r["clip"], seg)
            assert got["raw_response"] == want, (name, i)
            assert got["pred_choice"] == regex_extract(want, data_lib.parse_options(r["choices_text"]))
            opts = [o for _, o in data_lib.parse_options(r["choices_text"])]
            ll = torch_logliks(ref, tok, prompt, opts, d / "clips" / r["clip"], seg)
            np.testing.assert_allclose(got["scores"], ll, rtol=1e-4, atol=1e-3)
            assert got["likelihood_choice"] == "ABCD"[int(np.argmax(ll))]
            assert got["likelihood_correct"] == (got["likelihood_choice"] == r["correct_choice"])
            checked += 1
    assert checked == 5
    assert any(recs[k]["raw_response"] for k in recs if not recs[k].get("error"))


def test_bad_records_are_counted_errors_and_the_rest_completes(setup, both_run):
    out, res = both_run
    recs = {r["id"]: r for r in res["records"]}
    assert recs["Mood/2"]["error"] == "bad_correct_choice" and "'E'" in recs["Mood/2"]["message"]
    assert recs["Mood/3"]["error"] == "missing_field" and "'question'" in recs["Mood/3"]["message"]
    assert recs["Mood/4"]["error"] == "undecodable"
    assert res["errors"] == 3
    results = json.loads((out / "results.json").read_text())
    mood = results["models"]["tiny"]["subsets"]["Mood"]
    assert mood["n"] == 5 and mood["errors"] == 3
    k = sum(recs[f"Mood/{i}"]["correct"] for i in range(5))
    assert mood["accuracy"] == k / 5
    lines = [json.loads(x) for x in (out / "answers.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [f"Genre/{i}" for i in range(3)] + [f"Mood/{i}" for i in range(5)]
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| Mood | 5 |" in (out / "results.md").read_text()


REGEX_TABLE = [
    ("A", "A"), ("B", "B"), (" C ", "C"), ("D.", "D"), ("(B)", "B"), ("**C**", "C"), ("'A'", "A"),
    ("A. jazz", "A"), ("B) rock", "B"), ("(C) piano is playing", "C"), ("D: drums", "D"),
    ("The answer is B.", "B"), ("The answer is (C).", "C"), ("Answer: D", "D"), ("answer is A", "A"),
    ("I would pick option C here.", "C"), ("The correct choice is B, rock.", "B"),
    ("Not A, the answer is D.", "D"), ("It must be (B) because of the guitar.", "B"),
    ("Between the options, C. piano fits best", "C"), ("It sounds like rock to me.", "B"),
    ("This is a jazz tune.", "A"), ("The drums dominate the clip.", "D"), ("ROCK", "B"),
    ("jazz or rock", None), ("I am not sure.", None), ("", None), (None, None), ("None", None),
    ("Either jazz (A) or rock (B)", None), ("A or B", None), ("E", None), ("The answer is E.", None), ("a piano", "C"),
    ("<think>maybe A</think>B", "B"), ("It is (A) or (B)", None), ("rocks", None),
]


def test_regex_extractor_table():
    options = data_lib.parse_options(OPTS[0])
    assert options == [("A", "A. jazz"), ("B", "B. rock"), ("C", "C. piano"), ("D", "D. drums")]
    assert len(REGEX_TABLE) >= 30
    bad = [(s, want, regex_extract(s, options)) for s, want in REGEX_TABLE if regex_extract(s, options) != want]
    assert not bad


def test_scores_as_the_leaderboard_forms_them(tmp_path):
    recs = [{"id": i, "model": m, "subset": s, "correct": c, **({"error": "x"} if e else {})}
            for i, m, s, c, e in [(0, "m1", "X", True, 0), (1, "m1", "X", True, 0), (2, "m1", "X", False, 1),
                                  (3, "m1", "Y", True, 0),
                                  (0, "m2", "X", False, 0), (1, "m2", "X", True, 0), (2, "m2", "X", True, 0),
                                  (3, "m2", "Y", False, 0)]]
    res = summarize(recs, ["m1", "m2"], ["X", "Y"])
    x, y = res["models"]["m1"]["subsets"]["X"], res["models"]["m1"]["subsets"]["Y"]
    assert (x["n"], x["errors"], y["n"]) == (3, 1, 1)
    assert x["accuracy"] == pytest.approx(2 / 3) and y["accuracy"] == 1.0
    assert res["models"]["m1"]["average"] == pytest.approx((2 / 3 + 1) / 2)  # the mean of subsets, not 3/4
    assert res["models"]["m2"]["average"] == pytest.approx((2 / 3 + 0) / 2)
    np.testing.assert_allclose(x["ci95"], [0.2077, 0.9385], atol=1e-4)  # Wilson, 2 of 3 (textbook value)
    np.testing.assert_allclose(wilson(0, 10), [0.0, 0.2775], atol=1e-4)
    assert res["paired"]["X"] == {"a_only": 1, "b_only": 1, "p": 1.0}
    assert res["paired"]["all"]["a_only"] == 2 and res["paired"]["all"]["b_only"] == 1
    assert mcnemar_exact(1, 4) == pytest.approx(2 * (1 + 5) / 32)
    assert mcnemar_exact(0, 10) == pytest.approx(2 / 1024)
    write_reports(res, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert "| subset | n | m1 | m2 | m2 − m1 | McNemar p |" in md
    assert "| X | 3 | 66.7 [20.8, 93.9] (1 err) | 66.7 [20.8, 93.9] | +0.0 | 1 |" in md
    assert "| **average** |  | 83.3 | 33.3 | -50.0 | 1 (items) |" in md
    assert json.loads((tmp_path / "results.json").read_text()) == res
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Stub(http.server.BaseHTTPRequestHandler):
    posts: list = []
    fail_first: set = set()  # message substrings whose first request gets a 500
    always_fail: str = "\x00"

    def log_message(self, *a):
        pass

    def _send(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, {"data": [{"id": "qwen3-stub"}]} if self.path == "/v1/models" else {})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        type(self).posts.append((self.path, body))
        for s in list(type(self).fail_first):
            if s in content:
                type(self).fail_first.discard(s)
                return self._send(500, {"error": "busy"})
        if type(self).always_fail in content:
            return self._send(500, {"error": "down"})
        reply = "ABCD"[len(content) % 4]  # depends on the request, so a wrong pairing shows
        self._send(200, {"choices": [{"message": {"role": "assistant", "content": f"\n{reply} "}}]})


def test_openai_extractor_sends_the_protocol_message(setup, tmp_path):
    d, *_, api, subsets = setup
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    try:
        _Stub.posts, _Stub.fail_first, _Stub.always_fail = [], {OPTS[1]}, OPTS[2]  # Genre/2; Mood/0 and 1
        ex = OpenAIExtractor(url, "qwen3-stub", extra_body={}, backoff=0.0)
        ex.probe()
        res = run_lib.evaluate([("tiny", api)], data_lib.load_subsets(d / "mucue", ["Genre", "Mood"]), tmp_path,
                               settings=settings(extractor=ex, data_root=d / "mucue"))
    finally:
        server.shutdown()
        server.server_close()
    posts = _Stub.posts
    recs = {r["id"]: r for r in res["records"]}
    by_content = {}
    for path, body in posts:
        assert path == "/v1/chat/completions"
        assert set(body) == {"model", "messages", "temperature", "max_tokens"}
        assert body["model"] == "qwen3-stub" and body["temperature"] == 0.1 and body["max_tokens"] == 32
        assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
        by_content[body["messages"][0]["content"]] = "ABCD"[len(body["messages"][0]["content"]) % 4]
    answered = [r for r in recs.values() if not r.get("error")]
    assert len(answered) == 3
    for r in answered:
        item = next(x for x in subsets[r["subset"]] if r["prompt"].endswith(x["question"] + " " + x["choices_text"]))
        msg = ("\nextract the choice of A, B, C, D from the following answer.\nIf the answer is not clear, return "
               "\"None\", otherwise just return the single choice letter.\noptions: " + item["choices_text"]
               + "\n answer: \n" + r["raw_response"] + "\n\n")
        assert msg in by_content
        assert r["pred_choice"] == by_content[msg]
        assert r["correct"] == (r["pred_choice"] == r["correct_choice"])
    # one failed call is retried; a server that keeps failing gives an error record with the raw answer
    assert sum(OPTS[1] in b["messages"][0]["content"] for _, b in posts) == 2
    for k in ("Mood/0", "Mood/1"):
        assert recs[k]["error"] == "extractor_failed" and "after 4 tries" in recs[k]["message"]
        assert recs[k]["raw_response"] is not None
    assert sum(OPTS[2] in b["messages"][0]["content"] for _, b in posts) == 2 * 4  # 1 + 3 retries each

    # a server that is down stops the run before any work, with a one-line error naming the URL
    out = tmp_path / "down"
    rc = main([str(d / "conv"), "--data", str(d / "mucue"), "--out", str(out), "--extractor", "openai",
               "--extractor-url", url, "--extractor-model", "qwen3-stub", "--no-progress"])
    assert rc == 2 and not (out / "answers.jsonl").exists()


def test_down_server_message(setup, tmp_path, capsys):
    d, *_ = setup
    rc = main([str(d / "conv"), "--data", str(d / "mucue"), "--out", str(tmp_path), "--extractor", "openai",
               "--extractor-url", "http://127.0.0.1:9/v1", "--extractor-model", "m", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "http://127.0.0.1:9/v1/models" in err and len(err.strip().splitlines()) == 1
    assert main([str(d / "conv"), "--data", str(tmp_path / "absent"), "--out", str(tmp_path)]) == 2
    assert main([str(d / "conv"), "--data", str(d / "mucue"), "--out", str(tmp_path), "--subsets", "Nope"]) == 2
    assert "Nope" in capsys.readouterr().err
    assert not (tmp_path / "answers.jsonl").exists()


def test_mufun_style_json_records(tmp_path):
    recs = [{"id": "j1", "question": "Which?", "choices": ["jazz", "rock"], "answer": "rock", "audio": "a.wav"},
            {"question": "Which?", "choices": ["A. jazz", "B. rock"], "answer": "A", "audio": "a.wav", "time": [1, 2]},
            {"question": "Which?", "choices": ["jazz", "rock"], "answer": "pop", "audio": "a.wav"},
            {"question": "Which?", "choices": ["jazz", "rock"], "audio": "a.wav"}]
    (tmp_path / "moods.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    src = data_lib.load_subsets(tmp_path)["moods"]
    items = list(src.items())
    assert src.ids() == ["j1", "moods/1", "moods/2", "moods/3"]
    assert items[0].choices_text == "A. jazz B. rock" and items[0].correct_choice == "B"
    assert items[0].prompt == "Choose the correct option for the question based on the audio. Which? A. jazz B. rock"
    assert items[1].choices_text == "A. jazz B. rock" and items[1].correct_choice == "A"
    assert items[1].time_seg == [1.0, 2.0]
    assert items[2].error == "bad_correct_choice" and "'pop'" in items[2].message
    assert items[3].error == "missing_field" and "'answer'" in items[3].message


def _jsonl(p):
    return [json.loads(x) for x in Path(p).read_text().splitlines()]


@pytest.mark.slow  # a killed subprocess (or a second full run): the process boundary is the test
def test_killed_run_resumes_and_shards_merge(setup, tmp_path):
    """A CLI run on parquet files killed with SIGKILL, then resumed, ends with the records of one
    uninterrupted run; three shards merged give the same answers and results."""
    d, *_, api, subsets = setup
    import datasets

    pq = tmp_path / "pq"
    (pq / "data").mkdir(parents=True)
    many = [dict(r, question=f"{r['question']} ({k})") for k in range(4) for r in subsets["Genre"]]
    ds = datasets.Dataset.from_list([{k: v for k, v in r.items() if k != "clip"} for r in many]).cast_column(
        "audio", datasets.Audio(decode=False))
    ds.to_parquet(str(pq / "data" / "Genre-00000-of-00001.parquet"))
    ds.select(range(3)).to_parquet(str(pq / "data" / "Key-00000-of-00001.parquet"))
    sources = data_lib.load_subsets(pq)
    assert {k: len(v) for k, v in sources.items()} == {"Genre": 12, "Key": 3}

    clean = run_lib.evaluate([("tiny", api)], sources, tmp_path / "clean", settings=settings(data_root=pq))
    want = _jsonl(tmp_path / "clean" / "answers.jsonl")
    assert len(want) == 15 and not any(r.get("error") for r in want)

    out = tmp_path / "killed"
    p = subprocess.Popen([sys.executable, "-m", "mufun_jax.evaluate", f"tiny={d / 'conv'}", "--data", str(pq),
                          "--out", str(out), "--max-new-tokens", str(MAX_NEW), "--batch-size", "1", "--block", "1",
                          "--no-progress"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    ans = out / "answers.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and (not ans.exists() or len(ans.read_text().splitlines()) < 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    partial = _jsonl(ans)
    assert 2 <= len(partial) < 15, (len(partial), p.stderr.read()[-2000:])
    with open(ans, "a") as f:
        f.write('{"id": "Genre/11", "subset": "Genre", "model": "tiny", "raw_re')  # a line cut by the kill
    resumed = run_lib.evaluate([("tiny", api)], sources, out, settings=settings(data_root=pq))
    assert _jsonl(ans) == want == resumed["records"]
    assert json.loads((out / "results.json").read_text()) == clean["results"]

    sh = tmp_path / "sharded"
    for i in range(3):
        r = run_lib.evaluate([("tiny", api)], sources, sh, settings=settings(data_root=pq), shard=(i, 3))
        assert r["results"] is None and len(r["records"]) == 5
    assert not (sh / "answers.jsonl").exists()
    assert main([f"tiny={d / 'conv'}", "--data", str(pq), "--out", str(sh), "--merge"]) == 0
    assert _jsonl(sh / "answers.jsonl") == want
    assert json.loads((sh / "results.json").read_text()) == clean["results"]
    (sh / "answers.shard-1-of-3.jsonl").unlink()
    with pytest.raises(ValueError, match=r"shards \[1\] of 3 are missing"):
        run_lib.merge(["tiny"], sources, sh)


def test_likelihood_mode_answers_with_the_argmax(setup, both_run, tmp_path):
    d, *_, api, subsets = setup
    res = run_lib.evaluate([("tiny", api)], data_lib.load_subsets(d / "mucue", ["Genre"]), tmp_path,
                           settings=settings(mode="likelihood", data_root=d / "mucue"))
    both = {r["id"]: r for r in both_run[1]["records"]}
    for r in res["records"]:
        b = both[r["id"]]
        assert r["scores"] == b["scores"] and r["pred_choice"] == b["likelihood_choice"]
        assert r["raw_response"] == dict(data_lib.parse_options(r["prompt"].split("? ", 1)[1]))[r["pred_choice"]]
        assert r["correct"] == (r["pred_choice"] == r["correct_choice"])
    acc = json.loads((tmp_path / "results.json").read_text())["models"]["tiny"]["subsets"]["Genre"]["accuracy"]
    assert acc == sum(r["correct"] for r in res["records"]) / 3


def test_a_file_that_is_not_ours_is_refused_untouched(setup, tmp_path):
    from mufun_jax.outputs import ResultsFileError

    d, *_, api, _ = setup
    foreign = '{"id": 0, "answer": "infer.py wrote this"}\n'
    (tmp_path / "answers.jsonl").write_text(foreign)
    with pytest.raises(ResultsFileError, match="mufun-eval's output"):
        run_lib.evaluate([("tiny", api)], data_lib.load_subsets(d / "mucue"), tmp_path, settings=settings())
    assert (tmp_path / "answers.jsonl").read_text() == foreign
    assert main([str(d / "conv"), "--data", str(d / "mucue"), "--out", str(tmp_path), "--no-progress"]) == 2
    assert (tmp_path / "answers.jsonl").read_text() == foreign


def test_two_models_side_by_side(setup, both_run, tmp_path):
    """Two names over one model: every answer is the single run's, and the paired columns agree."""
    d, *_, api, _ = setup
    res = run_lib.evaluate([("base", api), ("tuned", api)], data_lib.load_subsets(d / "mucue"), tmp_path,
                           settings=settings(data_root=d / "mucue"))
    single = {r["id"]: r for r in both_run[1]["records"]}
    assert [r["model"] for r in res["records"]] == ["base"] * 8 + ["tuned"] * 8
    for r in res["records"]:
        assert r.get("raw_response") == single[r["id"]].get("raw_response") and r.get("error") == single[r["id"]].get(
            "error")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["models"]["base"] == results["models"]["tuned"]
    assert results["paired"]["all"] == {"a_only": 0, "b_only": 0, "p": 1.0}
    md = (tmp_path / "results.md").read_text()
    assert "| subset | n | base | tuned | tuned − base | McNemar p |" in md and "| +0.0 |" in md


@pytest.mark.slow  # the demo's own test runs mufun-eval in run(); a second model build here
def test_demo_clips_as_multiple_choice(setup, tmp_path, capsys):
    """The demo's held-out clips become one subset per task, and its summary is read from results.json."""
    from mufun_jax import demo
    from mufun_jax.data.synth import TASKS

    d, *_, api, _ = setup
    demo.prepare(tmp_path / "data", n_train=4, n_eval=6)
    held_out = json.loads((tmp_path / "data" / "eval.json").read_text())
    items = {it.id: it for src in data_lib.load_subsets(demo.multiple_choice(tmp_path / "data")).values()
             for it in src.items()}
    assert len(items) == 6
    for r in held_out:
        it = items[r["id"]]
        answers = list(TASKS[r["task"]][1].values())
        assert it.subset == r["task"] and it.error is None
        assert it.correct_choice == "ABCD"[answers.index(r["answer"])]
    capsys.readouterr()
    res = demo.evaluate_mc(api, tmp_path / "data", tmp_path / "mc", mode="both", max_new_tokens=MAX_NEW)
    printed = capsys.readouterr().out
    assert res == json.loads((tmp_path / "mc" / "results.json").read_text())
    assert set(res["models"]["demo"]["subsets"]) == {r["task"] for r in held_out}
    assert f"generated {res['models']['demo']['average']:.0%}, likelihood " in printed
