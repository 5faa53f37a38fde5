"""Streamed, resumable results files: what ``infer.py`` and ``mufun-eval`` write, behind one interface.

:func:`open_results` picks the writer from the output's suffix: ``.jsonl`` (:class:`ResultsFile`),
``.csv`` or ``.parquet`` (:class:`TableResults`); any other suffix is a :class:`ResultsFileError`
naming it. Every writer is a :class:`ResultsWriter`: opening it reads what an earlier run left and
says which keys are done (``done``, ``in``) and which error records are answered again
(``retried``); :meth:`~ResultsWriter.write` adds one record; :meth:`~ResultsWriter.close` makes
the output whole and durable; :meth:`~ResultsWriter.sort` rewrites it in a given order. What a
record is, and the key it is resumed by, is a :class:`RecordKind` (``INFER``: by ``id``;
``mufun_jax.evaluate``: by (model, id)), so every kind of record can go to every format.

JSONL, the default:

Each result is one line, written and flushed as soon as it completes, so a run killed at any
moment loses only its in-flight requests. Opening an existing file resumes it: the ids already
answered are skipped by the new run, so every id ends up exactly once.

Resume never destroys work. The only thing it drops is what a kill can leave behind: a last line
without its newline that begins like one of our records (``{"id": ``). Anything else it does not
recognise (a line in the middle that is not a result record, or a file that is not this tool's
output at all) raises :class:`ResultsFileError` and the file is left byte for byte as it was.
Error records of an earlier run are retried by default (``retry_errors``): they leave the file,
and their new outcome is appended, when the new run writes its first result.

``--shard I/N`` splits a request list between hosts: host ``I`` takes every request whose
position ``p`` satisfies ``p % N == I`` and writes ``NAME.shard-I-of-N.jsonl``. The shards are
disjoint and together cover the input; merge them with ``cat answers.shard-*-of-N.jsonl >
answers.jsonl`` (one line per id, in completion order), or :func:`merge_shards` (input order).

CSV and parquet: a table cannot take one more row per result without being rewritten, so each
result goes first to a hidden JSONL journal beside the output (``.NAME.journal.jsonl``, the
JSONL writer above, with its resume), and :meth:`~ResultsWriter.close` writes the table (the
earlier table's records plus the journal's) to a temporary name, moves it over the output and
removes the journal. A killed run leaves the old table and its journal; the next run reads both,
so every key still ends up once. Columns are the records' fields in first-seen order; a field a
record lacks is empty (None), and reading back leaves it out. CSV cells are exact: strings as they
are (JSON-quoted when they would read back as something else), other values as JSON. Parquet
columns keep their type where every value has the same scalar type, and hold JSON text otherwise
(named in the file's metadata, so they read back as they were written).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N), with ``0 <= I < N``."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r} must look like I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def shard_path(path: str | Path, shard: tuple[int, int] | None) -> Path:
    path = Path(path)
    if shard is None or shard[1] == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


class ResultsFileError(ValueError):
    """An existing output file that resume does not recognise as this tool's output; nothing was changed."""


_RECORD_START = b'{"id": '  # how every record we write begins (json.dumps of a dict whose first key is "id")


@dataclasses.dataclass(frozen=True)
class RecordKind:
    """What a results record is: the fields it is keyed by (resumed by, compared in JSON form), at
    least one of the fields that make it an answer, and the tool named in errors about foreign files."""

    tool: str
    key_fields: tuple[str, ...]
    answer_fields: tuple[str, ...]

    @property
    def shape(self) -> str:
        keys = ", ".join(f"'{f}'" for f in self.key_fields)
        return f"an object with {keys} and " + " or ".join(f"'{f}'" for f in self.answer_fields)

    def key_of(self, rec: dict) -> str:
        if len(self.key_fields) == 1:
            return _key(rec.get(self.key_fields[0]))
        return _key([rec.get(f) for f in self.key_fields])

    def is_record(self, rec) -> bool:
        return (isinstance(rec, dict) and all(f in rec for f in self.key_fields)
                and any(f in rec for f in self.answer_fields))


INFER = RecordKind("infer.py", ("id",), ("answer", "error"))


class ResultsWriter:
    """The interface of every results writer (see the module docstring). Opening one resumes:
    ``done`` maps the keys already answered to their records, ``retried`` lists the ids of earlier
    error records that this run answers again (with ``retry_errors``), ``key in writer`` asks
    ``done`` (a key is an id, or a tuple of the kind's key fields). The output changes only from
    the first :meth:`write` on: a run that fails before it leaves the output as it was."""

    path: Path
    kind: RecordKind
    done: dict
    retried: list

    def write(self, record: dict) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Flush, make the output whole (tables: assemble it), fsync; the writer may not write after it."""
        raise NotImplementedError

    def sort(self, keys: Iterable) -> None:
        """Rewrite the output (atomically) with the records of ``keys`` in that order; after :meth:`close`."""
        raise NotImplementedError

    def __contains__(self, key) -> bool:
        return _key(key) in self.done

    def _foreign(self, where: str, why: str, snippet: str) -> ResultsFileError:
        return ResultsFileError(
            f"{where}: {why}: {snippet!r}. This does not look like {self.kind.tool}'s output, so it was not touched; "
            "choose another --output, or repair or remove that line to resume")

    def _take(self, records: Iterable[tuple[str, Any]], retry_errors: bool) -> list:
        """Sort an earlier run's records (``(where, record)``) into ``done`` and ``retried``; returns
        the records to keep. A record that is not of this kind raises :class:`ResultsFileError`."""
        keep = []
        for where, rec in records:
            if not self.kind.is_record(rec):
                raise self._foreign(where, f"not a result record ({self.kind.shape})", json.dumps(rec)[:60])
            if retry_errors and rec.get("error") is not None:
                self.retried.append(rec.get("id"))
                continue
            self.done[self.kind.key_of(rec)] = rec
            keep.append(rec)
        return keep


class ResultsFile(ResultsWriter):
    """An append-only JSONL results file that can be resumed (see the module docstring); with
    ``retry_errors`` (the default) an earlier error record does not count as done."""

    def __init__(self, path: str | Path, *, retry_errors: bool = True, kind: RecordKind = INFER):
        self.path, self.kind = Path(path), kind
        self.retry_errors = retry_errors
        self.done, self.retried = {}, []
        self.dropped_tail = 0  # bytes of a partial last line, dropped at the first write
        self._keep: list[bytes] | None = None  # the lines to keep, when the file must be rewritten first
        if self.path.exists():
            self._recover()
        self._f = None  # opened at the first write: a run that fails before it leaves no file

    def _recover(self) -> None:
        if self.path.is_dir():
            raise ResultsFileError(f"{self.path}: is a directory, not a results file")
        raw = self.path.read_bytes()
        lines = raw.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        keep, errors = [], 0
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._foreign(f"{self.path}, line {n}", f"not JSON ({getattr(e, 'msg', e)})",
                                    line[:60].decode("utf-8", "replace")) from None
            if not self.kind.is_record(rec):
                raise self._foreign(f"{self.path}, line {n}", f"not a result record ({self.kind.shape})",
                                    line[:60].decode("utf-8", "replace"))
            if self._take([(f"{self.path}, line {n}", rec)], self.retry_errors):
                keep.append(line)
            else:
                errors += 1
        if tail and not tail.startswith(_RECORD_START):
            raise ResultsFileError(
                f"{self.path}: its last line {tail[:60].decode('utf-8', 'replace')!r} is not a result record cut "
                "short by a kill; the file was not touched: choose another --output")
        self.dropped_tail = len(tail)
        if tail or errors:
            self._keep = keep

    def write(self, record: dict) -> None:
        if self._f is None:
            self._open()
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done[self.kind.key_of(record)] = record

    def _open(self) -> None:
        """Append; first rewrite the file (atomically) without a partial last line and the error
        records being retried, when there are any."""
        if self._keep is not None:
            if self.dropped_tail:
                log.warning("%s: dropped a truncated last line (%d bytes) left by an interrupted run", self.path,
                            self.dropped_tail)
            tmp = self.path.with_name(f".{self.path.name}.resume")
            with open(tmp, "wb") as f:
                f.writelines(line + b"\n" for line in self._keep)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._keep = None
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def sort(self, ids: Iterable) -> None:
        _atomic(self.path, ".sorted", lambda f: _write_jsonl(f, _in_order(self.done, ids)))


class TableResults(ResultsWriter):
    """A CSV or parquet results table (``fmt``), resumable through its JSONL journal (see the module
    docstring). ``done`` holds the table's records and the journal's; the table is rewritten only
    at :meth:`close`, and only when this run or a killed earlier one wrote something."""

    def __init__(self, path: str | Path, fmt: str, *, retry_errors: bool = True, kind: RecordKind = INFER):
        self.path, self.fmt, self.kind = Path(path), fmt, kind
        self.done, self.retried = {}, []
        self.earlier: list[dict] = []  # the table's records that stay (its retried error records leave)
        if self.path.is_dir():
            raise ResultsFileError(f"{self.path}: is a directory, not a results file")
        if self.path.exists():
            rows = _read_table(self.path, fmt, kind)
            self.earlier = self._take(((f"{self.path}, row {n}", r) for n, r in enumerate(rows, 1)), retry_errors)
        self.journal = ResultsFile(self.path.with_name(f".{self.path.name}.journal.jsonl"),
                                   retry_errors=retry_errors, kind=kind)
        self.retried = [r for r in self.retried + self.journal.retried if _key(r) not in self.journal.done]
        self.done.update(self.journal.done)
        self._dirty = bool(self.journal.done)  # a killed run's records: the table is rebuilt at close

    def write(self, record: dict) -> None:
        self.journal.write(record)
        self.done[self.kind.key_of(record)] = record
        self._dirty = True

    def close(self) -> None:
        self.journal.close()
        if not self._dirty:
            return
        new = self.journal.done
        records = [r for r in self.earlier if self.kind.key_of(r) not in new] + list(new.values())
        _atomic(self.path, ".tmp", lambda f: _write_table(f, self.fmt, records))
        self.earlier, self._dirty = records, False
        self.journal.path.unlink(missing_ok=True)
        self.journal = ResultsFile(self.journal.path, kind=self.kind)  # empty: the table holds everything

    def sort(self, keys: Iterable) -> None:
        self.earlier = list(_in_order(self.done, keys))
        _atomic(self.path, ".sorted", lambda f: _write_table(f, self.fmt, self.earlier))


WRITERS = {".jsonl": None, ".csv": "csv", ".parquet": "parquet"}  # suffix -> table format (None: JSONL)


def open_results(path: str | Path, *, retry_errors: bool = True, kind: RecordKind = INFER) -> ResultsWriter:
    """The writer for ``path``, chosen by its suffix (``.jsonl``, ``.csv``, ``.parquet``), resuming
    what is there; an unknown suffix is a :class:`ResultsFileError` that names it."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITERS:
        raise ResultsFileError(f"{path}: unknown output suffix {suffix or '(none)'!r}: the output format is chosen by "
                               f"the suffix, one of {', '.join(WRITERS)}")
    if WRITERS[suffix] is None:
        return ResultsFile(path, retry_errors=retry_errors, kind=kind)
    return TableResults(path, WRITERS[suffix], retry_errors=retry_errors, kind=kind)


def write_table(path: str | Path, fmt: str, records: list[dict]) -> None:
    """Write ``records`` as a ``csv`` or ``parquet`` table at ``path``, atomically (the tables of
    :class:`TableResults`; the tagger's parquet output too)."""
    _atomic(Path(path), ".tmp", lambda f: _write_table(f, fmt, records))


def read_table(path: str | Path, fmt: str, kind: RecordKind) -> list[dict]:
    """The records of a table written by :func:`write_table`; :class:`ResultsFileError` for anything else."""
    return _read_table(Path(path), fmt, kind)


def _key(rid):
    """Ids compare by their JSON form (so 3 and "3" stay different, and lists work; a tuple is its list)."""
    return json.dumps(rid, sort_keys=True)


def _in_order(done: dict, keys: Iterable):
    for k in keys:
        rec = done.get(_key(k))
        if rec is not None:
            yield rec


def _atomic(path: Path, tag: str, write) -> None:
    """``write(binary file)`` to a hidden temporary name beside ``path``, fsync, move it over ``path``."""
    tmp = path.with_name(f".{path.name}{tag}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_jsonl(f, records) -> None:
    f.writelines((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8") for r in records)


def _columns(records) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r))


def _csv_cell(v) -> str:
    """Exact and readable: a string as it is unless it would read back as another value (then
    JSON-quoted); None empty; anything else JSON."""
    if v is None:
        return ""
    if isinstance(v, str):
        try:
            json.loads(v)
        except ValueError:
            return v if v else '""'
        return json.dumps(v, ensure_ascii=False)
    return json.dumps(v, ensure_ascii=False)


def _csv_value(cell: str):
    if cell == "":
        return None
    try:
        return json.loads(cell)
    except ValueError:
        return cell


_PARQUET_JSON = b"mufun.json_columns"  # schema metadata: the columns that hold JSON text


def _write_table(f, fmt: str, records: list[dict]) -> None:
    cols = _columns(records)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(cols)
        w.writerows([_csv_cell(r.get(c)) for c in cols] for r in records)
        f.write(buf.getvalue().encode("utf-8"))
        return
    import pyarrow as pa  # heavy: only parquet outputs load it
    import pyarrow.parquet as pq

    arrays, as_json = [], []
    for c in cols:
        values = [r.get(c) for r in records]
        kinds = {type(v) for v in values if v is not None}
        if len(kinds) <= 1 and kinds <= {str, int, float, bool}:
            arrays.append(pa.array(values, type=pa.string() if not kinds else None))
        else:  # mixed or nested: exact as JSON text
            arrays.append(pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in values],
                                   type=pa.string()))
            as_json.append(c)
    table = pa.Table.from_arrays(arrays, names=cols).replace_schema_metadata({_PARQUET_JSON: json.dumps(as_json)})
    pq.write_table(table, f)


def _read_table(path: Path, fmt: str, kind: RecordKind) -> list[dict]:
    """The records of a table written by :func:`_write_table` (fields that are None left out); a
    file that is not such a table raises :class:`ResultsFileError` (it is left as it was)."""
    hint = f"This does not look like {kind.tool}'s output, so it was not touched; choose another --output"
    if fmt == "csv":
        try:
            with open(path, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except (UnicodeDecodeError, csv.Error) as e:
            raise ResultsFileError(f"{path}: not a CSV file ({e}). {hint}") from None
        if not rows:
            return []
        cols, body = rows[0], rows[1:]
        if any(len(r) != len(cols) for r in body):
            raise ResultsFileError(f"{path}: rows of different lengths. {hint}")
        records = [{c: _csv_value(x) for c, x in zip(cols, r)} for r in body]
    else:
        import pyarrow as pa  # heavy: only parquet outputs load it
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise ResultsFileError(f"{path}: not a parquet file ({e}). {hint}") from None
        meta = table.schema.metadata or {}
        as_json = set(json.loads(meta.get(_PARQUET_JSON, b"[]")))
        records = table.to_pylist()
        for r in records:
            for c in as_json:
                if r.get(c) is not None:
                    r[c] = json.loads(r[c])
    if records and not all(f in records[0] for f in kind.key_fields):
        raise ResultsFileError(f"{path}: no {' and '.join(map(repr, kind.key_fields))} column. {hint}")
    return [{k: v for k, v in r.items() if v is not None} for r in records]


def merge_shards(paths: Iterable[str | Path], ids: Iterable, out: str | Path) -> int:
    """Merge shard files into ``out`` in the order of ``ids``; returns the number of records."""
    records = {}
    for p in paths:
        records.update(open_results(p, retry_errors=False).done)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rid in ids:
            rec = records.get(_key(rid))
            if rec is not None:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
    os.replace(tmp, out)
    return n
