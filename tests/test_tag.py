"""``mufun-tag`` (mufun_jax/tagging.py): a tiny random model on synthetic clips in nested folders.

A random model's answers are gibberish, so the plumbing is tested with the real engine (every
format written and read back; the records equal what one-at-a-time ``MuFun.chat`` calls give, so
sharing an encode and a prefix among a song's questions changes nothing; resume, overwrite,
shards; a SIGKILL mid-run), and the parsing on tables of answer strings.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mufun_jax.tag_answers import INST, PRESETS, TagFailure, build_record, load_preset, normalise_lyrics, \
    normalise_tags, parse_acestep
from mufun_jax.tag_formats import TMP_SUFFIX, read_sidecars, read_table
from mufun_jax.tagging import _seed, find_audio, main, tag_library

SR = 16000
WORDS = "genre jazz rock piano guitar drums tempo fast slow bright dark happy sad loud quiet song clip note".split()
QUESTIONS = {"genre": "What genre is this?", "mood": "Describe it.", "lyrics": "Any vocals?"}
CAP = 6
ROOT = Path(__file__).resolve().parents[1]

# -- parsing, on tables of answers -------------------------------------------------------------------

ACESTEP_ROWS = [  # (answer, finish_reason, (prompt, lyrics) or failure reason)
    ('{"prompt": "Pop, Rock", "lyrics": "[verse]\\nla la"}', "stop", ("pop, rock", "[verse]\nla la")),
    ('```json\n{"prompt": "pop, Female Vocal", "lyrics": "hey"}\n```', "stop", ("pop, female vocal", "hey")),
    ('```\n{"prompt": "pop", "lyrics": "hey"}', "stop", ("pop", "hey")),  # an unclosed fence
    ("{'prompt': 'Jazz, piano', 'lyrics': 'oh'}", "stop", ("jazz, piano", "oh")),  # single quotes
    ('Here it is: {"prompt": "edm", "lyrics": "go"} Hope this helps!', "stop", ("edm", "go")),  # text around it
    ('{"prompt": "edm", "lyrics": "go",}', "stop", ("edm", "go")),  # trailing comma
    ('{"prompt": "folk", "lyrics": "line one\nline two"}', "stop", ("folk", "line one\nline two")),  # raw newline
    ('{"Prompt": ["Rock", "rock ", "Metal"], "Lyrics": ["a", "b"]}', "stop", ("rock, metal", "a\nb")),
    ('{"prompt": "ambient", "lyrics": "纯音乐，请欣赏"}', "stop", ("ambient", INST)),
    ('{"prompt": "ambient", "lyrics": " 纯音乐, 请欣赏。"}', "stop", ("ambient", INST)),
    ('{"prompt": "ambient", "lyrics": ""}', "stop", ("ambient", INST)),
    ('{"prompt": "ambient", "lyrics": "[Instrumental]"}', "stop", ("ambient", INST)),
    ('{"prompt": "ambient", "lyrics": "纯音乐是我的爱"}', "stop", ("ambient", "纯音乐是我的爱")),  # real lyrics
    ("I cannot listen to this song.", "stop", "unparseable_json"),
    ('{"prompt": "pop", "lyrics": "la la la la', "length", "answer_cut"),
    ('{"prompt": "pop"}', "stop", "missing_field"),
    ('{"prompt": " , ", "lyrics": "x"}', "stop", "empty_prompt"),
    ('["pop", "la"]', "stop", "unparseable_json"),
]


@pytest.mark.parametrize("answer,finish,want", ACESTEP_ROWS)
def test_acestep_answer_repair_and_inst(answer, finish, want):
    if isinstance(want, str):
        with pytest.raises(TagFailure) as e:
            parse_acestep(answer, finish)
        assert e.value.reason == want and e.value.raw == {"acestep": answer}  # the raw text is kept
    else:
        assert parse_acestep(answer, finish) == want


@pytest.mark.parametrize("text,want", [
    ("Pop, Rock.\npop , Dance  Pop", ["pop", "rock", "dance pop"]),
    ("  \"Jazz\"；, - Piano，钢琴、钢琴 ", ["jazz", "piano", "钢琴"]),
    ("", []), (None, []), (["A", "a", "B!"], ["a", "b"]),
])
def test_tag_normalisation(text, want):
    assert normalise_tags(text) == want


def test_tags_preset_record():
    ans = {"genre": "Rock, Pop", "mood": "Happy.", "instruments": "Guitar, drums, rock", "key": "C major",
           "tempo": "120 BPM", "vocal": "Instrumental", "language": "English"}
    rec = build_record(PRESETS["tags"], {k: (v, "stop") for k, v in ans.items()})
    assert rec["prompt"] == "rock, pop, happy, guitar, drums, c major, 120 bpm, instrumental"  # no language guess
    assert rec["lyrics"] == INST and {k: rec[k] for k in ans} == ans
    rec = build_record(PRESETS["tags"], {k: (v, "stop") for k, v in dict(ans, vocal="Vocal").items()})
    assert rec["prompt"].endswith("vocal, english") and rec["lyrics"] is None
    assert normalise_lyrics("  hello\n") == "hello"


def test_yaml_presets(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("questions:\n  era: Which decade?\n  lyrics: Lyrics?\ntags: [era]\ntemperature: 0.5\n")
    pre = load_preset(str(p))
    assert pre.questions == {"era": "Which decade?", "lyrics": "Lyrics?"} and pre.temperature == 0.5
    assert pre.has_lyrics and pre.columns == ["prompt", "lyrics", "era"]
    p.write_text("era: Which decade?\n")  # the short form: a mapping of names to questions
    assert load_preset(str(p)).questions == {"era": "Which decade?"} and not load_preset(str(p)).has_lyrics
    p.write_text("path: Where?\n")
    with pytest.raises(ValueError, match="question name 'path'"):
        load_preset(str(p))
    with pytest.raises(ValueError, match="not acestep, tags or an existing YAML file"):
        load_preset(str(tmp_path / "nope.yaml"))


# -- the engine on a small library ------------------------------------------------------------------


def _clip(path: Path, s: int, secs: float, rng) -> None:
    t = np.arange(int(secs * SR)) / SR
    x = 0.4 * np.sin(2 * np.pi * 110 * (s + 1) * t) * (1 + np.sin(2 * np.pi * (s + 1) * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, (x + 0.05 * rng.standard_normal(t.size)).astype(np.float32), SR,
             subtype="FLOAT" if path.suffix == ".wav" else "PCM_16")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model directory (as tests/test_cli_errors.py), a library of 3 songs in nested folders
    plus an unreadable .mp3 and a text file, and a 3-question YAML preset."""
    from flax import nnx

    from mufun_jax.checkpoint import save_model
    from mufun_jax.config import WhisperConfig, preset
    from mufun_jax.data.tokenizer import build_tokenizer
    from mufun_jax.models import MuFun

    d = tmp_path_factory.mktemp("tag")
    rng = np.random.default_rng(0)
    tok = build_tokenizer([" ".join(rng.choice(WORDS, 6)) for _ in range(200)] + list(QUESTIONS.values()),
                          d / "tok", vocab_size=400)
    base = preset("mufun-tiny")
    cfg = base.replace(whisper=WhisperConfig(num_mel_bins=128, d_model=32, encoder_layers=2,
                                             encoder_attention_heads=2, encoder_ffn_dim=64),
                       taps=(0, 1, 2), connector_type="blp_3i_2x",
                       qwen3=dataclasses.replace(base.qwen3, vocab_size=len(tok)))
    params = nnx.to_pure_dict(nnx.state(MuFun(cfg, rngs=nnx.Rngs(3))))
    head = params["language_model"]["lm_head"]
    head["kernel"] = np.asarray(head["kernel"]) * 8.0  # greedy choices far from ties, and varied
    save_model(d / "model", cfg, params, tokenizer=tok)
    lib = d / "lib"
    for s, rel in enumerate(["a/one.wav", "a/b/two.flac", "three.wav"]):
        _clip(lib / rel, s, 1.0 + 0.5 * s, rng)
    (lib / "a" / "broken.mp3").write_bytes(rng.bytes(3000))
    (lib / "notes.txt").write_text("not audio")
    (lib / "a" / "._one.wav").write_bytes(b"\0\5\26\7")  # a macOS metadata stub: hidden, not a song
    (d / "preset.yaml").write_text("questions:\n" + "".join(f"  {k}: {v}\n" for k, v in QUESTIONS.items())
                                   + f"max_new_tokens: {CAP}\n")
    return d


@pytest.fixture(scope="module")
def engine(world):
    from mufun_jax.api import MuFun

    return MuFun.from_pretrained(world / "model", batch_size=4, max_new_tokens=CAP)


@pytest.fixture(scope="module")
def expected(world, engine):
    """Each song's record from one ``chat()`` per question, caches emptied before each, so no encode
    or prefix is shared: equality shows that the tagger's sharing changes nothing. Greedy (the random
    model's greedy answers hardly depend on the song) and sampled at temperature 1 with the seed
    the tagger gives that song and question (answers that differ per song: a record written under
    the wrong path cannot go unnoticed)."""
    pre = load_preset(str(world / "preset.yaml"))
    out = {}
    for temp in (0.0, 1.0):
        recs = {}
        for rel in ["a/b/two.flac", "a/one.wav", "three.wav"]:
            answers = {}
            for name, q in pre.questions.items():
                engine.generator.clear_caches()
                answers[name] = (engine.chat(q, audio_files=str(world / "lib" / rel), max_new_tokens=CAP,
                                             temperature=temp, seed=_seed(rel, name, 0)), None)
            recs[rel] = {"path": rel, **build_record(pre, answers)}
        out[temp] = recs
    assert len({r["prompt"] for r in out[1.0].values()}) == 3, "sampled answers should differ between songs"
    return out


def _records(fmt, lib: Path, out: Path) -> dict:
    """Read a run's output back, as ``{path: {prompt, lyrics, ...}}``."""
    if fmt in ("acestep", "caption"):
        return {rel: read_sidecars(fmt, out, rel) for rel in find_audio(lib)[0] if read_sidecars(fmt, out, rel)}
    if fmt == "hf":
        import datasets

        ds = datasets.load_from_disk(str(out)).cast_column("audio", datasets.Audio(decode=False))
        for r in ds:  # save_to_disk embeds each song's bytes: the dataset stands alone
            assert r["audio"]["bytes"] == (lib / r["path"]).read_bytes() and r["audio"]["path"] == Path(r["path"]).name
        return {r["path"]: {k: v for k, v in r.items() if k != "audio"} for r in ds}
    return read_table(fmt, out)


@pytest.mark.parametrize("fmt", ["acestep", "caption", "jsonl", "csv", "hf"])
def test_every_format_written_and_read_back(world, engine, expected, tmp_path, monkeypatch, fmt):
    from mufun_jax import audio

    lib = tmp_path / "lib"
    shutil.copytree(world / "lib", lib)
    out = None if fmt == "acestep" else tmp_path / {"caption": "captions", "hf": "ds"}.get(fmt, f"tags.{fmt}")
    engine.generator.clear_caches()  # the audio cache is keyed by content: `expected` left a song in it
    stats = dict(engine.generator.stats)
    decoded, load = [], audio.load_audio
    monkeypatch.setattr(audio, "load_audio", lambda path, seg=None: decoded.append(str(path)) or load(path, seg))
    s = tag_library(engine, lib, str(world / "preset.yaml"), fmt, out, progress=False, temperature=1.0)
    assert sorted(decoded) == sorted(str(lib / r) for r in find_audio(lib)[0])  # each file decoded once
    assert (s.songs, s.tagged, s.done_before, s.ignored) == (4, 3, 0, 2)
    assert s.failed == {"undecodable": 1} and [f["path"] for f in s.failures] == ["a/broken.mp3"]
    assert [json.loads(x)["reason"] for x in Path(s.failures_file).read_text().splitlines()] == ["undecodable"]
    grew = {k: engine.generator.stats[k] - stats.get(k, 0) for k in ("audio_encoded", "prefix_computed")}
    assert grew == {"audio_encoded": 3, "prefix_computed": 3}  # one encode and one prefix per song
    got = _records(fmt, lib, lib if out is None else out)
    if fmt in ("acestep", "caption"):
        want = {k: {"prompt": v["prompt"], "lyrics": v["lyrics"]} for k, v in expected[1.0].items()}
        if fmt == "acestep":
            assert (lib / "a" / "b" / "two_prompt.txt").is_file()  # beside the audio
    else:
        want = expected[1.0]
        if fmt == "csv":
            want = {k: {c: "" if x is None else x for c, x in v.items()} for k, v in want.items()}
        assert list(got) == sorted(got)  # one record per song, sorted by path
    assert got == want
    assert not list(Path(tmp_path).rglob(f"*{TMP_SUFFIX}")) and not list(Path(tmp_path).rglob("*.parts"))

    # resume: nothing redone; --overwrite redoes every song and writes the same records
    s = tag_library(engine, lib, str(world / "preset.yaml"), fmt, out, progress=False, temperature=1.0)
    assert (s.tagged, s.done_before, s.failed) == (0, 3, {"undecodable": 1})
    assert _records(fmt, lib, lib if out is None else out) == want
    if fmt == "jsonl":
        s = tag_library(engine, lib, str(world / "preset.yaml"), fmt, out, progress=False, overwrite=True,
                        temperature=1.0)
        assert (s.tagged, s.done_before) == (3, 0) and read_table(fmt, out) == want


def test_greedy_answers_equal_chat_and_shards_split_the_library(world, engine, expected, tmp_path):
    """Greedy records equal one-at-a-time chat()'s; two shards are disjoint and cover the library."""
    outs = []
    for i in range(2):
        s = tag_library(engine, world / "lib", str(world / "preset.yaml"), "jsonl", tmp_path / "t.jsonl",
                        shard=(i, 2), progress=False)
        outs.append(read_table("jsonl", Path(s.output)))
        assert s.output.endswith(f"t.shard-{i}-of-2.jsonl")
    assert outs[0] and outs[1] and not set(outs[0]) & set(outs[1]) and {**outs[0], **outs[1]} == expected[0.0]


def test_unusable_output_is_refused_untouched(world, engine, tmp_path):
    bad = tmp_path / "notes.jsonl"
    bad.write_text("my own notes\n")
    with pytest.raises(ValueError, match="not a mufun-tag record"):
        tag_library(engine, world / "lib", "tags", "jsonl", bad, progress=False)
    assert bad.read_text() == "my own notes\n"
    with pytest.raises(ValueError, match="needs --out"):
        tag_library(engine, world / "lib", "tags", "csv", None, progress=False)


@pytest.mark.parametrize("args,fragment", [
    (["--shard", "2/2"], "--shard '2/2'"),
    (["--format", "csv"], "--format csv needs --out"),
    (["--preset", "nope.yaml"], "not acestep, tags or an existing YAML file"),
    (["--batch-size", "0"], "--batch-size 0 must be >= 1"),
    (["--temperature", "-1"], "--temperature -1.0 must be >= 0"),
    (["--root-is-missing"], "no such directory"),
    (["--mesh", "1,2"], "--mesh '1,2' must be three sizes"),
    (["--mesh", "1,2,1"], "needs 2 devices, have 1"),
])
def test_cli_usage_errors_are_one_line(world, tmp_path, capsys, args, fragment):
    """rc 2 with one line, before the model loads, and nothing written."""
    root = tmp_path / "missing" if args == ["--root-is-missing"] else world / "lib"
    capsys.readouterr()
    rc = main([str(world / "model"), str(root), *(a for a in args if a != "--root-is-missing"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and fragment in err and err.count("\n") == 1 and err.startswith("mufun-tag: error: "), err
    assert not list(tmp_path.iterdir()) and [p.name for p in (world / "lib").rglob("*.txt")] == ["notes.txt"]


@pytest.fixture(scope="module")
def library12(world, engine, tmp_path_factory):
    """12 one-second songs in 3 folders, a one-question preset, and a clean run's prompts."""
    d = tmp_path_factory.mktemp("lib12")
    lib = d / "lib"
    rng = np.random.default_rng(1)
    rels = [f"d{s % 3}/s{s}.wav" for s in range(12)]
    for s, rel in enumerate(rels):
        _clip(lib / rel, s, 1.0, rng)
    (d / "one.yaml").write_text(f"questions:\n  genre: What genre is this?\nmax_new_tokens: {CAP}\n")
    clean = tag_library(engine, lib, str(d / "one.yaml"), "jsonl", d / "clean.jsonl", progress=False)
    want = {k: v["prompt"] for k, v in read_table("jsonl", Path(clean.output)).items()}
    assert sorted(want) == sorted(rels)
    return lib, d / "one.yaml", want


def _start(world, lib, preset, fmt, out) -> tuple[subprocess.Popen, list[str]]:
    cmd = [sys.executable, "-m", "mufun_jax.tagging", str(world / "model"), str(lib), "--preset", str(preset),
           "--format", fmt, "--out", str(out), "--batch-size", "1", "--max-new-tokens", str(CAP), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), cmd


def _wait_for(p: subprocess.Popen, ready) -> None:
    deadline = time.time() + 240
    while not ready() and p.poll() is None and time.time() < deadline:
        time.sleep(0.002)


@pytest.mark.slow  # a killed subprocess (or a second full run): the process boundary is the test
def test_sigkill_leaves_whole_files_and_restart_finishes(world, library12, tmp_path, capsys):
    """A run killed with SIGKILL once some songs are written: every file there is whole (equal to
    a clean run's), and the restart tags only the rest, leaving the finished files untouched."""
    lib, preset, want = library12
    out = tmp_path / "cap"
    p, cmd = _start(world, lib, preset, "caption", out)
    _wait_for(p, lambda: list(out.rglob("*.caption.txt")))
    p.send_signal(signal.SIGKILL)
    p.communicate()
    done = {f.relative_to(out).as_posix(): f for f in out.rglob("*.caption.txt")}
    assert 0 < len(done) < 12, f"the kill should land mid-run ({len(done)} of 12 songs were done)"
    for rel, f in done.items():
        assert f.read_text() == want[rel.replace(".caption.txt", ".wav")] + "\n"  # whole, not half
    mtimes = {rel: f.stat().st_mtime_ns for rel, f in done.items()}

    capsys.readouterr()
    rc = main(cmd[3:] + ["--mesh", "1,-1,1"])  # the restart, in-process, with the parameters on a mesh
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"{12 - len(done)} of 12 songs tagged" in err and f"{len(done)} already done" in err
    assert {rel: (out / rel).stat().st_mtime_ns for rel in done} == mtimes  # not redone
    assert {rel: read_sidecars("caption", out, rel)["prompt"] for rel in want} == want
    assert not list(out.rglob(f"*{TMP_SUFFIX}"))


@pytest.mark.slow  # a killed subprocess (or a second full run): the process boundary is the test
def test_sigterm_stops_after_a_song_and_writes_what_is_done(world, library12, tmp_path):
    """SIGTERM mid-run: exit 75, the JSONL assembled from the songs done (each whole), no parts left."""
    lib, preset, want = library12
    out = tmp_path / "tags.jsonl"
    p, _ = _start(world, lib, preset, "jsonl", out)
    parts = tmp_path / ".tags.jsonl.parts"
    _wait_for(p, lambda: parts.is_dir() and any(parts.glob("*.json")))
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=240)
    assert p.returncode == 75 and "stopped by SIGTERM" in err, err
    got = {k: v["prompt"] for k, v in read_table("jsonl", out).items()}
    assert 0 < len(got) < 12 and got == {k: want[k] for k in got}
    assert not parts.exists()
