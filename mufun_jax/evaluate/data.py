"""Multiple-choice evaluation data: MuCUE's layout and MuFun-style JSON, read into :class:`Item`.

Accepted ``--data`` forms (nothing is downloaded; see docs/evaluating.md for fetching MuCUE once):

- a directory written by ``DatasetDict.save_to_disk`` (read with ``datasets.load_from_disk``,
  memory-mapped; the ``audio`` column is read undecoded, as MuCUE-Bench does with
  ``Audio(decode=False)``);
- parquet or arrow files, one split per subset: a file, or a directory (searched recursively, as
  ``huggingface-cli download`` lays MuCUE out). A file's subset is its name up to the first ``-``
  (``GTZAN-00000-of-00002.parquet`` -> ``GTZAN``), or its directory's name when the file is
  ``data-*.arrow`` / ``train-*.parquet`` inside a per-split folder. Parquet and arrow are read with
  pyarrow (a ``datasets`` dependency) row group by row group, so a 25 GB copy is never in memory.
- MuFun-style JSON (a list) or JSONL, or a directory of them: ``{"id"?, "subset"?, "question",
  "choices": [option, ...], "answer": letter | option text, "audio": path, "time"?: [start, end]}``.
  The options are labelled ``A. ``, ``B. `` ... in order (unless they already are) and joined with a
  space into MuCUE's ``choices_text``; the subset is ``subset`` or else the file's stem.

MuCUE fields: ``question``, ``choices_text`` (``"A. ... B. ... C. ... D. ..."``), ``correct_choice``
(a letter), ``audio`` (``{"path", "bytes"}``), ``time_seg`` (``[start, end]`` seconds, or empty).
A record that lacks one of them, or whose ``correct_choice`` is not among its options, becomes an
:class:`Item` with ``error`` set: it is reported and counted, and the other items run.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterator

PROTOCOL_PREFIX = "Choose the correct option for the question based on the audio. "
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class DataError(ValueError):
    """``--data`` cannot be read at all (usage error, exit status 2)."""


def protocol_prompt(question: str, choices_text: str) -> str:
    """MuCUE-Bench's prompt, byte for byte: sent to ``chat()`` with the audio."""
    return PROTOCOL_PREFIX + question + " " + choices_text


def parse_options(choices_text: str) -> list[tuple[str, str]]:
    """``"A. x B. y"`` -> ``[("A", "A. x"), ("B", "B. y")]``: each option as written, found by
    searching for ``A.``/``A)``, then ``B.`` after it, and so on, each at the start or after a space.
    Sequential search keeps a later letter inside an option's text (``"Mr. B. King"``) from starting
    an option early only when that letter is the next one expected."""
    starts = []
    pos = 0
    for letter in LETTERS:
        m = re.compile(r"(?:^|(?<=\s))\(?" + letter + r"[.):]\s*").search(choices_text, pos)
        if m is None:
            break
        starts.append((letter, m.start()))
        pos = m.end()
    return [(letter, choices_text[s:(starts[k + 1][1] if k + 1 < len(starts) else None)].strip())
            for k, (letter, s) in enumerate(starts)]


def option_text(option: str) -> str:
    """``"A. Rock"`` -> ``"Rock"``."""
    return re.sub(r"^\(?[A-Z][.):]\s*", "", option).strip()


@dataclasses.dataclass
class Item:
    """One multiple-choice question, ready for the protocol."""

    id: Any
    subset: str
    index: int  # position in its subset
    prompt: str | None = None
    choices_text: str | None = None
    options: list | None = None  # [(letter, option as written), ...]
    correct_choice: str | None = None
    audio: Any = None  # a path (str), or {"path", "bytes"} as the dataset stores it
    time_seg: list | None = None
    error: str | None = None  # a reason key, when the record cannot be asked
    message: str | None = None


def _seg(value):
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return None
    if (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        return [float(value[0]), float(value[1])]
    raise ValueError(f"time_seg={value!r} must be [start, end] in seconds, or empty")


def make_item(rec: Any, subset: str, index: int) -> Item:
    """A MuCUE record (``choices_text``/``correct_choice``) or a MuFun-style one (``choices``/
    ``answer``) -> an :class:`Item`; bad records get ``error`` and a message naming the value."""
    rid = rec.get("id") if isinstance(rec, dict) else None
    item = Item(id=rid if rid is not None else f"{subset}/{index}", subset=subset, index=index)

    def fail(reason, message):
        item.error, item.message = reason, f"{item.id}: {message}"
        return item

    if not isinstance(rec, dict):
        return fail("malformed_record", f"expected an object, got {type(rec).__name__}")
    mufun_style = "choices" in rec and "choices_text" not in rec
    need = ("question", "choices", "answer", "audio") if mufun_style else (
        "question", "choices_text", "correct_choice", "audio")
    for field in need:
        if rec.get(field) is None:
            return fail("missing_field", f"missing field {field!r}")
    if not isinstance(rec["question"], str):
        return fail("malformed_record", f"question={rec['question']!r} is not a string")
    if mufun_style:
        choices = rec["choices"]
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
            return fail("malformed_record", f"choices={choices!r} must be a non-empty list of strings")
        if len(choices) > len(LETTERS):
            return fail("malformed_record", f"{len(choices)} choices: at most {len(LETTERS)}")
        labelled = all(re.match(rf"\(?{LETTERS[k]}[.):]\s", c) for k, c in enumerate(choices))
        texts = choices if labelled else [f"{LETTERS[k]}. {c}" for k, c in enumerate(choices)]
        choices_text = " ".join(texts)
        answer = str(rec["answer"]).strip()
        letters = LETTERS[:len(choices)]
        plain = [option_text(t) for t in texts]
        if len(answer) == 1 and answer.upper() in letters:
            correct = answer.upper()
        elif answer in choices or answer in plain:
            correct = letters[choices.index(answer) if answer in choices else plain.index(answer)]
        else:
            return fail("bad_correct_choice", f"answer={answer!r} is neither a letter in {letters} nor one of the "
                                              f"choices")
        time_seg = rec.get("time", rec.get("time_seg"))
    else:
        choices_text = rec["choices_text"]
        if isinstance(choices_text, list):  # a list of options: label and join them as the JSON form does
            choices_text = " ".join(c if re.match(rf"\(?{LETTERS[k]}[.):]\s", str(c)) else f"{LETTERS[k]}. {c}"
                                    for k, c in enumerate(choices_text))
        if not isinstance(choices_text, str):
            return fail("malformed_record", f"choices_text={choices_text!r} is not a string")
        correct = str(rec["correct_choice"]).strip()
        time_seg = rec.get("time_seg")
    item.prompt = protocol_prompt(rec["question"], choices_text)
    item.choices_text = choices_text
    item.options = parse_options(choices_text)
    item.correct_choice = correct
    if len(item.options) < 2:
        return fail("malformed_record", f"choices_text={choices_text!r}: fewer than two options 'A. ... B. ...'")
    if correct not in [letter for letter, _ in item.options]:
        return fail("bad_correct_choice", f"correct_choice={correct!r} is not among the options "
                                          f"{''.join(letter for letter, _ in item.options)}")
    try:
        item.time_seg = _seg(time_seg)
    except ValueError as e:
        return fail("bad_time", str(e))
    audio = rec["audio"]
    if isinstance(audio, dict):
        if not audio.get("path") and not audio.get("bytes"):
            return fail("missing_field", "audio has neither 'path' nor 'bytes'")
    elif not isinstance(audio, str):
        return fail("malformed_record", f"audio={type(audio).__name__} must be a path or {{'path', 'bytes'}}")
    item.audio = audio
    return item


# -- readers: each subset is a Source with a length and a way to read rows [start, stop) --------


class Source:
    """One subset: ``len()`` rows, read lazily by :meth:`rows` (audio bytes only for those rows)."""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> Iterator[dict]:
        raise NotImplementedError

    def items(self, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        stop = len(self) if stop is None else stop
        for k, rec in enumerate(self.rows(start, stop)):
            yield make_item(rec, self.name, start + k)

    def ids(self) -> list:
        """Every item's id, read without audio (resume and sharding need them before the run)."""
        return [r.get("id") if isinstance(r, dict) and r.get("id") is not None else f"{self.name}/{i}"
                for i, r in enumerate(self._id_rows())]

    def _id_rows(self):
        return self.rows(0, len(self))


class ListSource(Source):
    def __init__(self, name, records):
        super().__init__(name)
        self.records = records

    def __len__(self):
        return len(self.records)

    def rows(self, start, stop):
        return iter(self.records[start:stop])


class HFSource(Source):
    """A split of a ``load_from_disk`` DatasetDict, audio undecoded."""

    def __init__(self, name, ds):
        super().__init__(name)
        import datasets  # optional heavy dependency: only for save_to_disk directories

        if isinstance(ds.features.get("audio"), datasets.Audio):
            ds = ds.cast_column("audio", datasets.Audio(decode=False))
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def rows(self, start, stop):
        for a in range(start, stop, 64):
            batch = self.ds[a:min(stop, a + 64)]
            for k in range(len(next(iter(batch.values())))):
                yield {c: v[k] for c, v in batch.items()}

    def _id_rows(self):
        if "id" not in self.ds.column_names:
            return iter([{}] * len(self.ds))
        return ({"id": x} for x in self.ds["id"])


class ArrowSource(Source):
    """Parquet / arrow files of one split, read one row group (or record batch) at a time."""

    def __init__(self, name, files):
        super().__init__(name)
        self.files = sorted(files)
        self.parts = []  # (file, group index or None, rows)
        for f in self.files:
            if f.suffix == ".parquet":
                import pyarrow.parquet as pq  # optional heavy dependency

                meta = pq.ParquetFile(f).metadata
                self.parts += [(f, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
            else:
                self.parts.append((f, None, _arrow_table(f).num_rows))

    def __len__(self):
        return sum(n for *_, n in self.parts)

    def _read(self, f, group, columns=None):
        if group is None:
            t = _arrow_table(f)
            return t.select([c for c in columns if c in t.column_names]) if columns else t
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(f)
        if columns:
            columns = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read_row_group(group, columns=columns)

    def rows(self, start, stop, columns=None):
        at = 0
        for f, g, n in self.parts:
            if at + n > start and at < stop:
                t = self._read(f, g, columns)
                lo, hi = max(start - at, 0), min(stop - at, n)
                yield from t.slice(lo, hi - lo).to_pylist()
            at += n

    def _id_rows(self):
        return self.rows(0, len(self), columns=["id"])


def _arrow_table(f):
    import pyarrow as pa  # optional heavy dependency

    with pa.memory_map(str(f)) as src:
        try:
            return pa.ipc.open_stream(src).read_all()  # what datasets writes
        except pa.ArrowInvalid:
            src.seek(0)
            return pa.ipc.open_file(src).read_all()


def _json_records(f: Path) -> list:
    text = f.read_text(encoding="utf-8")
    try:
        if f.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{f}: expected a JSON list of records")
    return data


def _split_name(f: Path, root: Path) -> str:
    stem = f.name.split(".")[0]
    head = stem.split("-")[0]
    if head in ("data", "train", "test", "validation") and f.parent != root:
        return f.parent.name
    return head or stem


def load_subsets(path, subsets=None) -> dict[str, Source]:
    """``--data`` -> ``{subset: Source}`` in a stable order; ``subsets`` picks some (unknown names
    are a :class:`DataError` naming the available ones)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    out: dict[str, Source] = {}
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        import datasets  # optional heavy dependency: only for save_to_disk directories

        ds = datasets.load_from_disk(str(path))
        splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [(path.name, ds)]
        out = {name: HFSource(name, d) for name, d in splits}
    else:
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file())
        tables = [f for f in files if f.suffix in (".parquet", ".arrow")]
        jsons = [f for f in files if f.suffix in (".json", ".jsonl") and f.name not in (
            "dataset_info.json", "state.json", "dataset_dict.json")]
        groups: dict[str, list] = {}
        for f in tables:
            groups.setdefault(_split_name(f, path if path.is_dir() else path.parent), []).append(f)
        out = {name: ArrowSource(name, fs) for name, fs in groups.items()}
        for f in jsons:
            by_subset: dict[str, list] = {}
            for r in _json_records(f):
                sub = r.get("subset") if isinstance(r, dict) and isinstance(r.get("subset"), str) else f.stem
                by_subset.setdefault(sub, []).append(r)
            for name, recs in by_subset.items():
                if name in out:
                    raise DataError(f"{f}: subset {name!r} also comes from another file")
                out[name] = ListSource(name, recs)
        if not out:
            raise DataError(f"{path}: no save_to_disk dataset, parquet/arrow or JSON/JSONL files found")
    if subsets:
        unknown = [s for s in subsets if s not in out]
        if unknown:
            raise DataError(f"--subsets {unknown}: not in {path} (it has {sorted(out)})")
        out = {s: out[s] for s in subsets}
    return out
