"""``mufun-serve``: the OpenAI-compatible server, with the ``openai`` client against a tiny model on
loopback. One server (in a thread of this process, on the module's MuFun) serves most tests; the
offline answers it is compared with are computed before it starts, on the same engine."""

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from helpers import tiny_model_dir
from mufun_jax import audio

ROOT = Path(__file__).resolve().parents[1]
SR = audio.SAMPLE_RATE
KEY = "test-key"
CAP = 64
WORDS = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song clip note".split()
QUESTIONS = ["What genre is this?", "Is it fast?", "Describe it.", "Which instrument?", "Is it loud?", "Any vocals?",
             "What mood?", "How many beats?"]
MUCUE_PROMPT = "Which genre fits best? A. jazz B. rock C. piano D. drums"
KW = dict(batch_size=4, max_new_tokens=CAP, buckets=(64, 1024), max_chunks=3, max_batch_chunks=4, chunk_buckets=(4,),
          decode_steps=2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _audio_part(path: Path, how: str) -> dict:
    if how == "input_audio":
        return {"type": "input_audio", "input_audio": {"data": _b64(path), "format": path.suffix[1:]}}
    if how == "data_url":
        return {"type": "audio_url", "audio_url": {"url": f"data:audio/{path.suffix[1:]};base64,{_b64(path)}"}}
    return {"type": "audio_url", "audio_url": {"url": path.resolve().as_uri()}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    import uvicorn

    import mufun_jax
    from mufun_jax.serve import AudioPolicy, ServeSettings, create_app

    d = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    model_dir = tiny_model_dir(d, [" ".join(rng.choice(WORDS, 6)) for _ in range(200)] + QUESTIONS)
    songs = d / "songs"
    songs.mkdir()
    for s, name in enumerate(["one.wav", "two.flac"]):
        t = np.arange(int((1.5 + s) * SR)) / SR
        x = 0.4 * np.sin(2 * np.pi * 110 * (s + 1) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(songs / name, x.astype(np.float32), SR)
    sf.write(d / "long.wav", np.zeros(int(70 * SR), np.float32), SR)  # over --max-audio-seconds
    mufun = mufun_jax.MuFun.from_pretrained(model_dir, **KW)
    paths = [songs / "one.wav", songs / "two.flac"]
    want = {(p.name, q): mufun.chat(q, str(p), max_new_tokens=16) for p in paths for q in QUESTIONS}
    want_mucue = mufun.chat(MUCUE_PROMPT, str(paths[0]), max_new_tokens=64)
    # system, user, assistant, user: the client's system prompt replaces the template's
    from mufun_jax.data.templates import tokenize_with_audio
    from mufun_jax.generate import Request

    turns = ("You tag music. USER: <audio>\nWhat genre is this? ASSISTANT: jazz" + mufun.template.end_token
             + "USER: Is it fast? ASSISTANT:")
    out = mufun.generator.generate([Request(tokenize_with_audio(turns, mufun.tokenizer),
                                            [audio.chunk(audio.load_audio(paths[0]))])], max_new_tokens=16)[0]
    want_turns = mufun.decode(out.token_ids, out.finish_reason)
    settings = ServeSettings(served_model_name="mufun-tiny", api_key=KEY, max_queue=12, max_body_mb=2.0,
                             audio=AudioPolicy(max_seconds=60.0, allowed_dir=songs))
    app = create_app(mufun, settings)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if httpx.get(url + "/health").status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield dict(url=url, app=app, mufun=mufun, paths=paths, want=want, want_mucue=want_mucue, want_turns=want_turns, d=d, model=model_dir)
    server.should_exit = True
    thread.join(30)


@pytest.fixture
def client(world):
    from openai import OpenAI

    return OpenAI(base_url=world["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _ask(client, content, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 16)
    return client.chat.completions.create(model="mufun-tiny", messages=[{"role": "user", "content": content}], **kw)


def test_concurrent_requests_equal_offline_answers(world, client):
    """16 requests at once (2 songs x 8 questions, input_audio, data: and file:// URLs, the audio
    part before or after the text) join one batch; each greedy answer equals the offline engine's."""
    engine = world["app"].state.engine
    encoded = world["mufun"].generator.stats["audio_encoded"]
    jobs = []
    for s, p in enumerate(world["paths"]):
        for k, q in enumerate(QUESTIONS):
            part = _audio_part(p, ("input_audio", "data_url", "file")[(s + k) % 3])
            jobs.append(((p.name, q), [{"type": "text", "text": q}, part] if k % 2 else [part, {"type": "text", "text": q}]))
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda j: _ask(client, j[1]), jobs))
    for (key, _), r in zip(jobs, got):
        assert r.choices[0].message.content == world["want"][key], key
        assert r.choices[0].finish_reason in ("stop", "length")
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 300
    assert world["mufun"].generator.stats["audio_encoded"] - encoded <= 2  # the same audio is encoded once
    assert engine.in_flight == 0


def test_mucue_bench_shaped_request_equals_chat(world, client):
    """MuCUE-Bench's vllm_model.py: [text, input_audio] with base64 wav, max_completion_tokens 64, temperature 0."""
    r = client.chat.completions.create(
        model="mufun-tiny", temperature=0, max_completion_tokens=64,
        messages=[{"role": "user", "content": [{"type": "text", "text": MUCUE_PROMPT},
                                                {"type": "input_audio",
                                                 "input_audio": {"data": _b64(world["paths"][0]), "format": "wav"}}]}])
    assert r.choices[0].message.content == world["want_mucue"]


def test_stream_concatenates_to_the_same_text(world, client):
    for n_q, q in enumerate(QUESTIONS[:3]):
        content = [_audio_part(world["paths"][1], "input_audio"), {"type": "text", "text": q}]
        chunks = list(_ask(client, content, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == world["want"][(world["paths"][1].name, q)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_sampling_n_seed_and_logprobs(world, client):
    content = [_audio_part(world["paths"][0], "input_audio"), {"type": "text", "text": "Describe it."}]
    a = _ask(client, content, temperature=1.5, seed=11, n=3, logprobs=True)
    b = _ask(client, content, temperature=1.5, seed=11, n=3)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice its own seed
    lp = a.choices[0].logprobs.content
    assert lp and all(x.logprob <= 0 for x in lp)
    greedy = _ask(client, content, logprobs=True)
    offline = world["mufun"].generate([{"prompt": "Describe it.", "audio": str(world["paths"][0])}],
                                      max_new_tokens=16, return_details=True)[0]
    np.testing.assert_allclose([x.logprob for x in greedy.choices[0].logprobs.content],
                               offline.logprobs[:len(greedy.choices[0].logprobs.content)], rtol=1e-5, atol=1e-5)


def test_stop_strings_and_system_turns(world, client):
    content = [_audio_part(world["paths"][0], "input_audio"), {"type": "text", "text": "Describe it."}]
    full = _ask(client, content, extra_body={"ignore_eos": True}, max_tokens=24).choices[0].message.content
    assert len(full) >= 8
    stop = full[4:6]
    stopped = _ask(client, content, extra_body={"ignore_eos": True}, max_tokens=24, stop=[stop, "never seen"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[:full.find(stop)].strip()
    streamed = _ask(client, content, extra_body={"ignore_eos": True}, max_tokens=24, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[:full.find(stop)].strip()
    messages = [{"role": "system", "content": "You tag music."},
                {"role": "user", "content": [_audio_part(world["paths"][0], "input_audio"),
                                             {"type": "text", "text": "What genre is this?"}]},
                {"role": "assistant", "content": "jazz"},
                {"role": "user", "content": "Is it fast?"}]
    r = client.chat.completions.create(model="mufun-tiny", messages=messages, temperature=0, max_tokens=16)
    assert r.choices[0].message.content == world["want_turns"]


@pytest.mark.parametrize("case,status", [
    ("bad_key", 401), ("no_key", 401), ("malformed_json", 400), ("bad_base64", 400), ("undecodable", 400),
    ("unknown_part", 400), ("too_long", 400), ("audio_too_long", 413), ("body_too_big", 413),
    ("unknown_model", 404), ("remote_url", 400), ("outside_dir", 400), ("max_tokens", 400)])
def test_errors_have_openai_shape_and_status(world, case, status):
    url, d = world["url"] + "/v1/chat/completions", world["d"]
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    text = {"type": "text", "text": "What genre is this?"}
    body = {"model": "mufun-tiny", "messages": [{"role": "user", "content": [text]}], "max_tokens": 4}
    part = lambda p: {"role": "user", "content": [text, p]}
    if case == "bad_key":
        headers["Authorization"] = "Bearer wrong"
    elif case == "no_key":
        del headers["Authorization"]
    elif case == "bad_base64":
        body["messages"] = [part({"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}})]
    elif case == "undecodable":
        body["messages"] = [part({"type": "input_audio", "input_audio": {"data": base64.b64encode(
            os.urandom(3000)).decode(), "format": "mp3"}})]
    elif case == "unknown_part":
        body["messages"] = [part({"type": "image_url", "image_url": {"url": "x"}})]
    elif case == "too_long":
        body["messages"] = [{"role": "user", "content": " ".join(WORDS * 80)}]
    elif case == "audio_too_long":
        body["messages"] = [part(_audio_part(d / "long.wav", "input_audio"))]
    elif case == "unknown_model":
        body["model"] = "gpt-4o"
    elif case == "remote_url":
        body["messages"] = [part({"type": "audio_url", "audio_url": {"url": "http://127.0.0.1:9/a.wav"}})]
    elif case == "outside_dir":
        body["messages"] = [part(_audio_part(d / "long.wav", "file"))]
    elif case == "max_tokens":
        body["max_tokens"] = CAP + 1
    data = b"{not json" if case == "malformed_json" else json.dumps(body).encode()
    if case == "body_too_big":
        data = json.dumps({**body, "pad": "x" * (3 << 20)}).encode()
    r = httpx.post(url, content=data, headers=headers, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and "type" in err
    if case == "too_long":
        assert "1024" in err["message"]
    if case == "max_tokens":
        assert str(CAP) in err["message"]


def test_queue_full_is_429_with_retry_after(world, client, monkeypatch):
    engine = world["app"].state.engine
    monkeypatch.setattr(engine, "max_queue", 0)
    with engine.lock:
        engine.in_flight += engine.gen.batch_size  # every slot taken
    try:
        r = httpx.post(world["url"] + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                       json={"model": "mufun-tiny", "messages": [{"role": "user", "content": "hi"}]})
    finally:
        with engine.lock:
            engine.in_flight -= engine.gen.batch_size
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_models_health_and_metrics(world, client):
    assert [m.id for m in client.models.list().data] == ["mufun-tiny"]
    assert httpx.get(world["url"] + "/health").json() == {"status": "ok"}
    _ask(client, [_audio_part(world["paths"][0], "input_audio"), {"type": "text", "text": "Is it loud?"}])
    text = httpx.get(world["url"] + "/metrics").text
    for name in ("mufun_requests_total", "mufun_queue_length", "mufun_busy_slots", "mufun_generated_tokens_total",
                 "mufun_generated_tokens_per_second", "mufun_time_to_first_token_seconds_count",
                 'mufun_cache{cache="audio",kind="hits"}', 'mufun_cache{cache="prefix",kind="reused"}'):
        assert name in text, name
    served = [ln for ln in text.splitlines() if ln.startswith('mufun_requests_total{outcome="200"}')]
    assert served and float(served[0].split()[-1]) >= 1


def test_disconnect_mid_stream_frees_the_slot(world, client):
    """A client that leaves mid-stream: its slot frees at the next decode call, the others finish."""
    engine = world["app"].state.engine
    for _ in range(100):  # earlier tests' stop strings end requests early too: let those settle
        if engine.in_flight == 0:
            break
        time.sleep(0.05)
    aborted = engine.aborted
    content = [_audio_part(world["paths"][1], "input_audio"), {"type": "text", "text": "Describe it."}]
    others = ThreadPoolExecutor(3)
    futures = [others.submit(_ask, client, [_audio_part(world["paths"][0], "input_audio"),
                                            {"type": "text", "text": q}]) for q in QUESTIONS[:3]]
    body = {"model": "mufun-tiny", "messages": [{"role": "user", "content": content}], "stream": True,
            "max_tokens": CAP, "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", world["url"] + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(4)]  # role chunk, then the first text
        assert got[0].startswith("data: ")
    for f, q in zip(futures, QUESTIONS[:3]):
        assert f.result().choices[0].message.content == world["want"][(world["paths"][0].name, q)]
    for _ in range(100):
        if engine.aborted > aborted and engine.in_flight == 0:
            break
        time.sleep(0.05)
    assert engine.aborted == aborted + 1 and engine.in_flight == 0
    assert world["mufun"].generator.stats["generated_tokens"] > 0


def test_one_failing_request_fails_alone(world, client, monkeypatch):
    from mufun_jax.serve import app as app_mod

    def broken(*a):
        raise RuntimeError("injected")

    monkeypatch.setattr(app_mod, "_logprob_entries", broken)
    with ThreadPoolExecutor(4) as pool:
        part = _audio_part(world["paths"][0], "input_audio")
        bad = pool.submit(_ask, client, [part, {"type": "text", "text": "Is it fast?"}], logprobs=True)
        good = [pool.submit(_ask, client, [part, {"type": "text", "text": q}]) for q in QUESTIONS[:3]]
        from openai import InternalServerError

        with pytest.raises(InternalServerError, match="injected"):
            bad.result()
        for f, q in zip(good, QUESTIONS[:3]):
            assert f.result().choices[0].message.content == world["want"][(world["paths"][0].name, q)]


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(world):
    """``mufun-serve`` in its own process: SIGTERM while three answers stream; they finish, new
    connections are refused, and the process exits 0."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "mufun_jax.serve.cli", str(world["model"]), "--port", str(port),
                             "--api-key", KEY, "--max-new-tokens", str(CAP), "--decode-steps", "1",
                             "--batch-size", "4", "--drain-seconds", "60"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.2)
        body = {"model": "model", "messages": [{"role": "user", "content": "Describe it."}], "stream": True,
                "max_tokens": CAP, "ignore_eos": True, "temperature": 0}
        started = threading.Barrier(4)

        def one():
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120,
                              headers={"Authorization": f"Bearer {KEY}"}) as r:
                lines = r.iter_lines()
                first = [next(lines) for _ in range(4)]
                started.wait()
                rest = list(lines)
            chunks = [json.loads(ln[6:]) for ln in first + rest if ln.startswith("data: {")]
            return [ln for ln in rest if ln][-1], chunks[-1]["choices"][0]["finish_reason"]

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(one) for _ in range(3)]
            started.wait(timeout=120)
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            with pytest.raises(httpx.HTTPError):
                httpx.get(url + "/health", timeout=5)
            for f in futures:
                assert f.result() == ("data: [DONE]", "length")
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
