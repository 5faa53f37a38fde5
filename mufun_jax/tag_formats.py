"""The output formats of ``mufun-tag`` (:mod:`mufun_jax.tagging`), each resumable and written atomically.

A song's record is ``{"path", "prompt", "lyrics", <one key per question>}`` (``path`` relative to
the library folder, ``lyrics`` None when the preset has no lyrics). Every file is written to a
hidden temporary name beside its target and moved over it with ``os.replace``, so a kill at any
moment leaves either the old file or the new one, never half of one.

- ``acestep``: ``NAME_prompt.txt`` and ``NAME_lyrics.txt`` beside each audio file, or mirrored
  under ``--out`` (same sub-folders); ``caption``: ``NAME.caption.txt`` and ``NAME.lyrics.txt``
  (ACE-Step 1.5). A song is done when its files exist. The lyrics file is written only by presets
  that produce lyrics (``acestep``, or a YAML preset with a ``lyrics`` question).
- ``jsonl``, ``csv``, ``parquet``: one file, one record per song (parquet through
  :func:`mufun_jax.outputs.write_table`, the results writers' table format); ``hf``: a Hugging Face dataset
  (``datasets.save_to_disk``) with columns ``audio``, ``path``, ``prompt``, ``lyrics`` and one per
  question (``audio`` holds the song's bytes: ``save_to_disk`` embeds them). Each finished song
  is first saved as its own small JSON in ``.OUT.parts/``; the file
  (or dataset) is assembled from the earlier file plus those parts at the end of a run, and the
  parts are then removed. A killed run keeps its parts, so the next run skips those songs.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
from pathlib import Path

from mufun_jax.errors import InputError
from mufun_jax.outputs import RecordKind, ResultsFileError, read_table as read_results_table, write_table

FORMATS = ("acestep", "caption", "jsonl", "csv", "parquet", "hf")
TAG_RECORDS = RecordKind("mufun-tag", ("path",), ("prompt",))  # a song's record, keyed by its path
SIDECARS = {"acestep": ("_prompt.txt", "_lyrics.txt"), "caption": (".caption.txt", ".lyrics.txt")}
TMP_SUFFIX = ".mufun-tag-tmp"


class OutputError(InputError):
    """An output path that cannot be used (not ours, unreadable, a missing folder); nothing was changed."""


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` through a hidden temporary file and ``os.replace``: readers (and a
    later run) see the old file or the whole new one. The temporary name is fixed per target, so a
    kill's leftover is overwritten by the next write of that file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(path: Path, shard) -> Path:
    """``tags.jsonl`` -> ``tags.shard-I-of-N.jsonl`` (a dataset folder ``ds`` -> ``ds.shard-I-of-N``)."""
    if shard is None or shard[1] == 1:
        return path
    return path.with_name(f"{path.stem}.shard-{shard[0]}-of-{shard[1]}{path.suffix}")


class SidecarWriter:
    """``acestep`` / ``caption``: two small text files per song."""

    def __init__(self, fmt: str, root: Path, out: Path | None, has_lyrics: bool):
        self.suffixes = SIDECARS[fmt] if has_lyrics else SIDECARS[fmt][:1]
        self.root, self.base = root, out if out is not None else root
        self.path = self.base

    def files(self, rel: str) -> list[Path]:
        r = Path(rel)
        return [self.base / r.parent / (r.stem + s) for s in self.suffixes]

    def key(self, rel: str) -> str:
        """Songs with the same key would write the same files (``a.mp3`` and ``a.wav``)."""
        return str(self.files(rel)[0])

    def done(self, rel: str) -> bool:
        return all(p.is_file() for p in self.files(rel))

    def write(self, rel: str, record: dict) -> None:
        files = self.files(rel)
        if len(files) > 1:  # lyrics first: the prompt file, checked first by tools, completes the pair
            atomic_write(files[1], (record.get("lyrics") or "") + "\n")
        atomic_write(files[0], record["prompt"] + "\n")

    def finish(self, columns) -> None:
        pass


def read_sidecars(fmt: str, base: Path, rel: str) -> dict:
    """The prompt and lyrics a sidecar format holds for one song (what tests and tools read back)."""
    r = Path(rel)
    out = {}
    for key, suffix in zip(("prompt", "lyrics"), SIDECARS[fmt]):
        p = base / r.parent / (r.stem + suffix)
        if p.is_file():
            with open(p, encoding="utf-8", newline="") as f:
                out[key] = f.read().removesuffix("\n")
    return out


class TableWriter:
    """``jsonl`` / ``csv`` / ``hf``: one output assembled from per-song parts (see the module docstring)."""

    def __init__(self, fmt: str, root: Path, out: Path, overwrite: bool, progress: bool = True):
        self.fmt, self.root, self.path, self.progress = fmt, root, out, progress
        self.parts = out.with_name(f".{out.name}.parts")
        if not out.parent.is_dir():
            raise OutputError("bad_output", f"{out.parent}: no such directory for --out")
        if fmt == "hf":
            _recover_swap(out)
        self.earlier, self.new = {}, {}  # --overwrite: neither the earlier output nor earlier parts count
        if not overwrite:
            self.earlier = read_table(fmt, out) if out.exists() else {}
        if self.parts.is_dir() and not overwrite:
            for p in sorted(self.parts.glob("*.json")):
                try:
                    rec = json.loads(p.read_text(encoding="utf-8"))
                    self.new[rec["path"]] = rec
                except (ValueError, KeyError, TypeError):
                    p.unlink()  # cannot happen with atomic writes; dropping it only makes that song run again

    def key(self, rel: str) -> str:
        return rel

    def done(self, rel: str) -> bool:
        return rel in self.new or rel in self.earlier

    def write(self, rel: str, record: dict) -> None:
        atomic_write(self.parts / (hashlib.sha1(rel.encode()).hexdigest()[:20] + ".json"),
                     json.dumps(record, ensure_ascii=False))
        self.new[rel] = record

    def finish(self, columns: list[str]) -> None:
        """Write the earlier records and this run's, sorted by path, then drop the parts."""
        if not self.new and self.path.exists():
            return
        records = dict(self.earlier)
        records.update(self.new)  # with --overwrite, stale parts of a killed earlier run are dropped here too
        rows = [records[k] for k in sorted(records)]
        cols = ["path", "prompt", "lyrics"] + [c for c in columns if c not in ("path", "prompt", "lyrics")]
        if self.fmt == "jsonl":
            atomic_write(self.path, "".join(json.dumps({c: r.get(c) for c in cols}, ensure_ascii=False) + "\n"
                                            for r in rows))
        elif self.fmt == "csv":
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            for r in rows:
                w.writerow({c: "" if r.get(c) is None else r.get(c) for c in cols})
            atomic_write(self.path, buf.getvalue())
        elif self.fmt == "parquet":
            write_table(self.path, "parquet", [{c: r.get(c) for c in cols} for r in rows])
        else:
            self._save_dataset(rows, cols)
        if self.parts.exists():
            shutil.rmtree(self.parts)

    def _save_dataset(self, rows: list[dict], cols: list[str]) -> None:
        import datasets  # optional (pip install mufun-jax[hf]); checked before any work in tagging.main

        data = {"audio": [str(self.root / r["path"]) for r in rows]}
        data.update({c: [r.get(c) for r in rows] for c in cols})
        feats = datasets.Features({"audio": datasets.Value("string"), **{c: datasets.Value("string") for c in cols}})
        # Cast from path strings: encoding through the Audio feature would need torchcodec.
        ds = datasets.Dataset.from_dict(data, features=feats).cast_column("audio", datasets.Audio())
        tmp = self.path.with_name(f".{self.path.name}{TMP_SUFFIX}")
        if tmp.exists():
            shutil.rmtree(tmp)
        if not self.progress:
            datasets.disable_progress_bars()
        ds.save_to_disk(str(tmp))  # embeds each song's bytes (path: the file name): the dataset stands alone
        del ds
        old = self.path.with_name(f".{self.path.name}.old")
        if self.path.exists():
            os.replace(self.path, old)  # a kill from here to the next line is undone by _recover_swap
        os.replace(tmp, self.path)
        if old.exists():
            shutil.rmtree(old)


def _recover_swap(out: Path) -> None:
    """A kill between the two renames of a dataset swap leaves ``.OUT.old`` and no ``OUT``: put it back."""
    old = out.with_name(f".{out.name}.old")
    if old.exists():
        if out.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, out)


def read_table(fmt: str, path: Path) -> dict:
    """``{path: record}`` of a jsonl / csv file or an hf dataset written by this tool. Anything
    else raises :class:`OutputError` (it is left untouched)."""
    hint = "; choose another --out, or --overwrite to replace it"
    if fmt == "hf":
        if not (path / "dataset_info.json").is_file():
            raise OutputError("bad_output", f"{path}: not a dataset saved by datasets.save_to_disk{hint}")
        import datasets  # optional (pip install mufun-jax[hf])

        ds = datasets.load_from_disk(str(path))
        if "path" not in ds.column_names:
            raise OutputError("bad_output", f"{path}: a dataset without a 'path' column{hint}")
        rows = ds.remove_columns(["audio"]).to_list() if "audio" in ds.column_names else ds.to_list()
        return {r["path"]: r for r in rows}
    if path.is_dir():
        raise OutputError("bad_output", f"{path}: is a directory, not a {fmt} file{hint}")
    if fmt == "parquet":
        try:
            rows = read_results_table(path, "parquet", TAG_RECORDS)
        except ResultsFileError:
            raise OutputError("bad_output", f"{path}: not a mufun-tag parquet table{hint}") from None
        if not all(isinstance(r.get("path"), str) and "prompt" in r for r in rows):
            raise OutputError("bad_output", f"{path}: not a mufun-tag table (no 'path' and 'prompt' columns){hint}")
        return {r["path"]: r for r in rows}
    with open(path, encoding="utf-8", newline="") as f:  # newline="": a quoted CSV field keeps its "\r"
        text = f.read()
    out = {}
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if not (isinstance(rec, dict) and isinstance(rec.get("path"), str) and "prompt" in rec):
                raise OutputError("bad_output", f"{path}, line {n}: not a mufun-tag record{hint}")
            out[rec["path"]] = rec
        return out
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames is None or "path" not in reader.fieldnames or "prompt" not in reader.fieldnames:
        raise OutputError("bad_output", f"{path}: not a mufun-tag CSV (no 'path' and 'prompt' columns){hint}")
    for row in reader:
        out[row["path"]] = row
    return out


def make_writer(fmt: str, root: Path, out: Path | None, *, has_lyrics: bool, overwrite: bool, shard=None,
                progress: bool = True):
    if fmt in SIDECARS:
        if out is not None and out.exists() and not out.is_dir():
            raise OutputError("bad_output", f"--out {out}: not a directory (format {fmt} mirrors the library there)")
        return SidecarWriter(fmt, root, out, has_lyrics)
    if out is None:
        raise OutputError("usage", f"--format {fmt} needs --out (the {'dataset folder' if fmt == 'hf' else 'file'} "
                                   "to write)")
    return TableWriter(fmt, root, shard_name(out, shard), overwrite, progress)


def failures_path(writer) -> Path:
    """Where a run's failures go: ``OUT.failures.jsonl`` beside a table output, or
    ``mufun-tag-failures.jsonl`` in the sidecar folder."""
    if isinstance(writer, TableWriter):
        return writer.path.with_name(writer.path.stem + ".failures.jsonl")
    return writer.base / "mufun-tag-failures.jsonl"
