"""Datasets with every kind of bad record mixed into good ones: the good ones all arrive, in
order, each with its own audio; the bad ones are counted by reason; nothing crashes."""

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mufun_jax.config import IMAGE_TOKEN_INDEX
from mufun_jax.data.dataset import SkipCounter, iter_samples, read_records
from mufun_jax.data.templates import get_template

SR = 16000


def tone(path: Path, freq: float, seconds: float, sr: int = SR):
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), sr)


def conv(q="<audio>\nWhat is this?", a="A tone."):
    return [{"from": "human", "value": q}, {"from": "gpt", "value": a}]


def dominant_hz(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x[:SR]))
    return float(np.argmax(spec))  # a 1 s window: bin index = Hz


@pytest.fixture
def dataset(tmp_path):
    good, bad = [], {}
    (tmp_path / "garbage.wav").write_bytes(b"not audio at all" * 100)
    (tmp_path / "notes.txt").write_text("hi")
    np.save(tmp_path / "empty.npy", np.zeros(0, np.float32))
    records = []
    for k in range(6):  # good samples, each with its own frequency so a mix-up is visible
        tone(tmp_path / f"g{k}.wav", 200 + 100 * k, 2 + 20 * (k == 5), sr=44100 if k % 2 else SR)
        records.append({"id": f"good{k}", "audio": f"g{k}.wav", "conversations": conv(a=f"Tone {k}.")})
        good.append((f"good{k}", 200 + 100 * k))
    # two audios in one sample, per-audio segments with a null
    tone(tmp_path / "two_a.wav", 1100, 3)
    tone(tmp_path / "two_b.wav", 1300, 40)
    records.insert(3, {"id": "good_two", "audio": ["two_a.wav", "two_b.wav"], "time": [None, [0, 30.0]],
                       "conversations": conv(q="<audio> then <audio>?", a="Two tones.")})
    bad_records = [
        ({"id": "b_missing", "audio": "nope.wav", "conversations": conv()}, "missing_file"),
        ({"id": "b_garbage", "audio": "garbage.wav", "conversations": conv()}, "undecodable"),
        ({"id": "b_ext", "audio": "notes.txt", "conversations": conv()}, "unsupported_extension"),
        ({"id": "b_empty", "audio": "empty.npy", "conversations": conv()}, "empty_audio"),
        ({"id": "b_segment", "audio": "g0.wav", "time": [50, 60], "conversations": conv()}, "segment_out_of_range"),
        ({"id": "b_tags", "audio": ["g0.wav", "g1.wav"], "conversations": conv()}, "audio_tag_mismatch"),
        ({"id": "b_notags", "audio": "g0.wav", "conversations": conv(q="No tag here")}, "audio_tag_mismatch"),
        ({"id": "b_gptfirst", "audio": "g0.wav", "conversations": conv()[::-1]}, "bad_conversation"),
        ({"id": "b_odd", "audio": "g0.wav", "conversations": conv()[:1]}, "bad_conversation"),
        ({"id": "b_noconv", "audio": "g0.wav"}, "malformed_record"),
        ("just a string", "malformed_record"),
        ({"id": "b_time", "audio": ["g0.wav", "g1.wav"], "time": [0, 1],
          "conversations": conv(q="<audio><audio>")}, "bad_time"),
    ]
    for i, (rec, reason) in enumerate(bad_records):
        records.insert(2 * i % (len(records) + 1), rec)
        bad[reason] = bad.get(reason, 0) + 1
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n{not json\n")
    bad["malformed_record"] += 1
    return path, good, bad


def test_good_samples_arrive_bad_ones_are_counted(dataset, qwen_tok):
    path, good, bad = dataset
    counter = SkipCounter()
    samples = list(iter_samples(read_records(path, counter), template=get_template("qwen2_instruct"),
                                tokenizer=qwen_tok, audio_root=path.parent, counter=counter))
    assert dict(counter) == bad
    by_id = {s.id: s for s in samples}
    assert [s.id for s in samples if s.id != "good_two"] == [g for g, _ in good]
    for sample_id, hz in good:
        s = by_id[sample_id]
        assert s.input_ids.count(IMAGE_TOKEN_INDEX) == 1
        assert abs(dominant_hz(s.chunks[0][0]) - hz) <= 2, sample_id  # its own audio, not a neighbour's
    assert by_id["good5"].chunks_per_audio == [1]  # 22 s: one chunk
    two = by_id["good_two"]
    assert two.input_ids.count(IMAGE_TOKEN_INDEX) == 2
    assert two.chunks_per_audio == [1, 1]  # [0, 30.0] honoured: 40 s cropped to 30 s
    assert len(two.chunks[1][0]) == 30 * SR
    assert [round(dominant_hz(c[0])) for c in two.chunks] == [1100, 1300]


def test_validate_cli_reports_counts(dataset, qwen_tok, capsys):
    """``python -m mufun_jax.data validate``'s main, in this process: exit status and report."""
    from mufun_jax.data.__main__ import main

    path, good, bad = dataset
    tok_dir = path.parent / "tok"
    qwen_tok.save_pretrained(tok_dir)
    capsys.readouterr()
    rc = main(["validate", str(path), "--tokenizer", str(tok_dir), "--audio-root", str(path.parent), "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"good samples: {len(good) + 1}" in out.out
    assert f"skipped: {sum(bad.values())}" in out.out
    for reason, n in bad.items():
        assert any(line.split() == [reason, str(n)] for line in out.out.splitlines()), (reason, out.out)


def test_broken_json_list_names_the_file_and_position(tmp_path):
    p = tmp_path / "data.json"
    p.write_text('[{"id": "a"},\n {"id": ]')
    with pytest.raises(ValueError, match=r"data\.json.*line 2"):
        read_records(p)


def test_validate_without_a_tokenizer_checks_everything_else(dataset, capsys):
    """No tokenizer: structure, audio files, segments and tag counts are still checked, and the report
    says the token checks were skipped; with one, --seq-len counts samples that are too long."""
    from mufun_jax.data.__main__ import main

    path, good, bad = dataset
    capsys.readouterr()
    rc = main(["validate", str(path), "--audio-root", str(path.parent), "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert f"good samples: {len(good) + 1}" in out.out and f"skipped: {sum(bad.values())}" in out.out
    assert "token checks skipped" in out.out


def test_validate_counts_samples_longer_than_seq_len(dataset, qwen_tok):
    from mufun_jax.data.dataset import validate

    path, good, bad = dataset
    n, counter = validate(path, template=get_template("qwen2_instruct"), tokenizer=qwen_tok,
                          audio_root=path.parent, seq_len=400, progress=False)
    assert counter["too_long"] == 1 and n == len(good)  # the two-audio sample has 600 audio slots
