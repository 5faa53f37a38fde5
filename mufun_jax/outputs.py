"""Streamed, resumable JSONL results: what ``infer.py`` writes.

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
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

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


class ResultsFile:
    """An append-only JSONL results file that can be resumed (see the module docstring).

    ``done`` maps the ids already answered to their records; with ``retry_errors`` (the default)
    an error record does not count as done, and ``retried`` lists those ids. The file is changed
    only at the first :meth:`write`: a run that fails before writing leaves it untouched.

    Subclasses may key records otherwise (``mufun_jax.evaluate`` keys them by (model, id)) by
    overriding :meth:`key_of` and :meth:`is_record`; ``in`` and :meth:`sort` then take such keys."""

    tool = "infer.py"  # named in the message for a file that is not ours
    record_shape = "an object with 'id' and 'answer' or 'error'"

    @staticmethod
    def key_of(rec: dict) -> str:
        """The key a record is resumed by (compared in JSON form)."""
        return _key(rec.get("id"))

    @staticmethod
    def is_record(rec) -> bool:
        return isinstance(rec, dict) and "id" in rec and ("answer" in rec or "error" in rec)

    def __init__(self, path: str | Path, *, retry_errors: bool = True):
        self.path = Path(path)
        self.retry_errors = retry_errors
        self.done: dict = {}  # id -> its record, for the ids already in the file
        self.retried: list = []  # ids of earlier error records that this run answers again
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
                rec, why = None, f"not JSON ({getattr(e, 'msg', e)})"
            else:
                why = f"not a result record ({self.record_shape})"
            if not self.is_record(rec):
                snippet = line[:60].decode("utf-8", "replace")
                raise ResultsFileError(
                    f"{self.path}, line {n}: {why}: {snippet!r}. This does not look like {self.tool}'s output, so it "
                    "was not touched; choose another --output, or repair or remove that line to resume")
            if self.retry_errors and rec.get("error") is not None:
                errors += 1
                self.retried.append(rec["id"])
                continue
            self.done[self.key_of(rec)] = rec
            keep.append(line)
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
        self.done[self.key_of(record)] = record

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

    def __contains__(self, rid) -> bool:
        return _key(rid) in self.done

    def close(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None

    def sort(self, ids: Iterable) -> None:
        """Rewrite the file in the order of ``ids`` (atomically); call it after :meth:`close`."""
        tmp = self.path.with_name(f".{self.path.name}.sorted")
        with open(tmp, "w", encoding="utf-8") as f:
            for rid in ids:
                rec = self.done.get(_key(rid))
                if rec is not None:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _key(rid):
    """Ids compare by their JSON form (so 3 and "3" stay different, and lists work)."""
    return json.dumps(rid, sort_keys=True)


def merge_shards(paths: Iterable[str | Path], ids: Iterable, out: str | Path) -> int:
    """Merge shard files into ``out`` in the order of ``ids``; returns the number of records."""
    records = {}
    for p in paths:
        records.update(ResultsFile(p, retry_errors=False).done)
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
