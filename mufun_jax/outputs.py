"""Streamed, resumable JSONL results: what ``infer.py`` writes.

Each result is one line, written and flushed as soon as it completes, so a run killed at any
moment loses only its in-flight requests. Opening an existing file resumes it: a last line cut
short by a kill is detected (no newline, or not JSON) and dropped, and the ids already written are
skipped by the new run, so every id ends up exactly once.

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


class ResultsFile:
    """An append-only JSONL results file that can be resumed (see the module docstring)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.done: dict = {}  # id -> its record, for the ids already in the file
        self.dropped_tail = False
        if self.path.exists():
            self._recover()
        self._f = None  # opened at the first write: a run that fails before it leaves no file

    def _recover(self) -> None:
        raw = self.path.read_bytes()
        good = 0  # byte length of the complete, parseable lines
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            self.done[_key(rec.get("id"))] = rec
            good += len(line)
        if good < len(raw):
            self.dropped_tail = True
            log.warning("%s: dropped a truncated last line (%d bytes) left by an interrupted run", self.path,
                        len(raw) - good)
            with open(self.path, "r+b") as f:
                f.truncate(good)

    def __contains__(self, rid) -> bool:
        return _key(rid) in self.done

    def write(self, record: dict) -> None:
        if self._f is None:
            self._f = open(self.path, "a", encoding="utf-8")
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.done[_key(record.get("id"))] = record

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
        f = ResultsFile(p)
        f.close()
        records.update(f.done)
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
