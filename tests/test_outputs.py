"""The results writers behind mufun_jax.outputs.open_results (JSONL, CSV, parquet): each one gives
back exactly the records written, resumes a run killed after k records so that every id ends up
once, answers earlier error records again, leaves a foreign file alone, and the suffix picks the
writer (an unknown one is a clear error)."""

import json
import re

import pytest

from mufun_jax.outputs import RecordKind, ResultsFileError, TableResults, open_results

SUFFIXES = (".jsonl", ".csv", ".parquet")
RECORDS = [  # what infer.py and mufun-eval write: mixed fields, nested values, tricky strings and ids
    {"id": 0, "answer": "Rock.", "finish_reason": "stop", "num_tokens": 3},
    {"id": "3", "answer": "", "finish_reason": "length", "num_tokens": 0},
    {"id": "a,b\n\"c\"", "answer": "null", "finish_reason": "stop", "num_tokens": 1},
    {"id": 7, "error": "missing_file", "message": "clip7.wav: no such file"},
    {"id": [1, "x"], "answer": "Jazz", "answer_index": 1,
     "scores": [{"candidate": "Rock", "total": -3.25, "mean": -1.5, "token_logprobs": [-1.0, -2.25]}]},
    {"id": 9, "answer": "0.5", "finish_reason": "stop", "num_tokens": 2},
]


def _ids(writer):
    return sorted(writer.done)


def _read_back(path):
    w = open_results(path, retry_errors=False)
    return w, [w.done[k] for k in w.done]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_each_writer_round_trips_its_records(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    w = open_results(path)
    assert not path.exists() and not w.done  # nothing is written before the first record
    for r in RECORDS:
        w.write(r)
    w.close()
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # no journal left
    _, back = _read_back(path)
    assert back == RECORDS
    for r in RECORDS:
        assert r["id"] in w
    assert 3 not in w and "0" not in w  # ids compare by their JSON form
    w.sort([r["id"] for r in reversed(RECORDS)])
    assert _read_back(path)[1] == RECORDS[::-1]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("closed", [False, True], ids=["killed", "closed"])
def test_a_run_stopped_after_k_records_resumes_each_id_once(tmp_path, suffix, closed):
    path = tmp_path / f"out{suffix}"
    ids = list(range(10))
    first = open_results(path)
    for i in ids[:4]:
        first.write({"id": i, "answer": f"a{i}"})
    if closed:
        first.close()  # else: killed (the JSONL file or the table's journal holds what was written)
    again = open_results(path)
    assert sorted(i for i in ids if i in again) == ids[:4] and not again.retried
    for i in ids:
        if i not in again:
            again.write({"id": i, "answer": f"a{i}"})
    again.close()
    _, back = _read_back(path)
    assert sorted(r["id"] for r in back) == ids
    assert all(r["answer"] == f"a{r['id']}" for r in back)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_error_records_are_answered_again(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    w = open_results(path)
    w.write({"id": 1, "answer": "ok"})
    w.write({"id": 2, "error": "missing_file", "message": "gone"})
    w.close()
    kept = open_results(path, retry_errors=False)
    assert 2 in kept and not kept.retried
    again = open_results(path)
    assert again.retried == [2] and 2 not in again and 1 in again
    again.close()  # nothing written: the output is as it was
    assert 2 in open_results(path, retry_errors=False)
    again = open_results(path)
    again.write({"id": 2, "answer": "found"})
    again.close()
    _, back = _read_back(path)
    assert sorted((r["id"], r.get("answer")) for r in back) == [(1, "ok"), (2, "found")]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_records_keyed_by_model_and_id(tmp_path, suffix):
    kind = RecordKind("mufun-eval", ("model", "id"), ("pred_choice", "error"))
    path = tmp_path / f"answers{suffix}"
    w = open_results(path, kind=kind)
    for m in ("a", "b"):
        w.write({"id": 1, "model": m, "pred_choice": "A"})
    w.close()
    again = open_results(path, kind=kind)
    assert ("a", 1) in again and ("b", 1) in again and ("c", 1) not in again


@pytest.mark.parametrize("suffix,content", [(".jsonl", "hello\n"), (".csv", "name,size\nx,1\n"),
                                            (".parquet", "not parquet at all")])
def test_a_foreign_file_is_left_alone(tmp_path, suffix, content):
    path = tmp_path / f"out{suffix}"
    path.write_text(content)
    with pytest.raises(ResultsFileError, match="infer.py's output"):
        open_results(path)
    assert path.read_text() == content


def test_the_suffix_picks_the_writer_and_an_unknown_one_is_named(tmp_path):
    assert isinstance(open_results(tmp_path / "x.CSV"), TableResults)
    assert type(open_results(tmp_path / "x.jsonl")).__name__ == "ResultsFile"
    for name, shown in (("x.json", "'.json'"), ("x.txt", "'.txt'"), ("answers", "'(none)'")):
        with pytest.raises(ResultsFileError, match=re.escape(f"unknown output suffix {shown}") + ".*jsonl, .csv, .parquet"):
            open_results(tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_csv_cells_are_readable(tmp_path):
    w = open_results(tmp_path / "out.csv")
    for r in RECORDS[:2]:
        w.write(r)
    w.close()
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "id,answer,finish_reason,num_tokens"
    assert lines[1] == "0,Rock.,stop,3" and lines[2] == '"""3""","""""",length,0'
    assert json.loads('"3"') == "3"


def test_the_tagger_writes_and_resumes_parquet(tmp_path):
    from mufun_jax.tag_formats import OutputError, make_writer, read_table

    out = tmp_path / "tags.parquet"
    songs = {"a/one.wav": {"path": "a/one.wav", "prompt": "rock, guitar", "lyrics": None, "genre": "rock"},
             "two.mp3": {"path": "two.mp3", "prompt": "jazz", "lyrics": "la la", "genre": "jazz"}}
    w = make_writer("parquet", tmp_path, out, has_lyrics=True, overwrite=False)
    w.write("a/one.wav", songs["a/one.wav"])
    again = make_writer("parquet", tmp_path, out, has_lyrics=True, overwrite=False)  # killed before finish
    assert again.done("a/one.wav") and not again.done("two.mp3")
    again.write("two.mp3", songs["two.mp3"])
    again.finish(["genre"])
    back = read_table("parquet", out)
    assert back == {k: {c: v for c, v in r.items() if v is not None} for k, r in songs.items()}
    assert make_writer("parquet", tmp_path, out, has_lyrics=True, overwrite=False).done("two.mp3")
    (tmp_path / "other.parquet").write_text("not a table")
    with pytest.raises(OutputError, match="not a mufun-tag parquet table"):
        make_writer("parquet", tmp_path, tmp_path / "other.parquet", has_lyrics=True, overwrite=False)
