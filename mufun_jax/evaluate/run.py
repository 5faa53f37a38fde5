"""The evaluation loop: every (model, item) answered once, streamed to ``answers.jsonl``, then scored.

Models run one after the other (one model's weights in memory at a time); each model's items go
through :meth:`mufun_jax.MuFun.iter_results` in blocks of ``block`` items, so the engine batches
them (each audio encoded once for all its questions) while only one block's audio bytes are held
(MuCUE stores audio as bytes: they are written to a temporary file per distinct clip, so the
engine's audio cache keys them like files, and the decode path is the file path the reference
``chat()`` takes). Generation is greedy with the protocol prompt; likelihood mode scores each
option as written in ``choices_text`` (``"A. Rock"``) after the same prompt and takes the argmax
of the summed log-probabilities.

Resume and shards reuse :mod:`mufun_jax.outputs`: the answers file is a results writer keyed by
(model, id) (``answers.jsonl``, or ``.csv`` / ``.parquet`` with ``answers_format``), so a killed run
started again skips what is on disk; ``--shard I/N`` takes every N-th item (over all subsets in
order) into ``answers.shard-I-of-N.jsonl``, and ``--merge`` joins the shards into ``answers.jsonl``
(refusing if an item is missing) and writes the reports.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from mufun_jax.evaluate.data import Item, Source
from mufun_jax.evaluate.extract import ExtractorError, regex_extract
from mufun_jax.evaluate.scoring import summarize, write_reports
from mufun_jax.outputs import RecordKind, ResultsWriter, _key, open_results, shard_path

log = logging.getLogger(__name__)
MODES = ("generate", "likelihood", "both")


ANSWERS = RecordKind("mufun-eval", ("model", "id"), ("pred_choice", "error"))  # one record per (model, item)
FORMATS = ("jsonl", "csv", "parquet")


def answers_file(path, *, retry_errors: bool = True) -> ResultsWriter:
    """The answers file at ``path`` (its suffix picks the format), resumable like infer.py's output."""
    return open_results(path, retry_errors=retry_errors, kind=ANSWERS)


@dataclasses.dataclass
class Settings:
    mode: str = "generate"
    extractor: Any = None  # None: regex; else an object with .extract(choices_text, raw_response)
    max_new_tokens: int = 64
    block: int = 256  # items per iter_results call (bounds the audio bytes held)
    extract_workers: int = 8
    progress: bool = True
    audio_root: Any = None  # relative audio paths resolve against this, then the data directory
    data_root: Any = None


def plan(sources: dict[str, Source], shard: tuple[int, int] | None = None) -> list[tuple[str, int, Any]]:
    """(subset, index, id) of every item this run owns, in subset order; ids must be unique."""
    out, seen, dups = [], set(), []
    for name, src in sources.items():
        for i, rid in enumerate(src.ids()):
            k = _key(rid)
            if k in seen:
                dups.append(rid)
            seen.add(k)
            out.append((name, i, rid))
    if dups:
        raise ValueError(f"duplicate item ids {dups[:5]}: ids must be unique (answers are resumed by id)")
    if shard is not None:
        out = [t for p, t in enumerate(out) if p % shard[1] == shard[0]]
    return out


_SNIFF = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
          (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))
_EXTS = {".wav", ".flac", ".ogg", ".oga", ".mp3", ".opus", ".m4a", ".aac", ".webm", ".mp4", ".npy"}


def audio_file(item: Item, tmp: Path, settings: Settings) -> str:
    """The file to decode: ``path`` when it exists (absolute, or under --audio-root or the data
    directory), else ``bytes`` written to ``tmp`` (one file per distinct content), else the path as
    given, which the engine reports as ``missing_file``."""
    a = item.audio
    path = a if isinstance(a, str) else a.get("path")
    if path:
        p = Path(path)
        for base in ([None] if p.is_absolute() else [settings.audio_root, settings.data_root]):
            if base is None and not p.is_absolute():
                continue
            cand = p if base is None else Path(base) / p
            if cand.is_file():
                return str(cand)
    data = a.get("bytes") if isinstance(a, dict) else None
    if data:
        ext = Path(path).suffix.lower() if path else ""
        if ext not in _EXTS:
            ext = next((e for magic, e in _SNIFF if data.startswith(magic)), ".mp3")  # av probes the content anyway
        f = tmp / (hashlib.sha1(data).hexdigest() + ext)
        if not f.exists():
            f.write_bytes(data)
        return str(f)
    base = settings.audio_root or settings.data_root
    return str(Path(base) / path) if base is not None and not Path(path).is_absolute() else str(path)


def _base(item: Item, model: str) -> dict:
    return {"id": item.id, "subset": item.subset, "model": model, "prompt": item.prompt}


def error_record(item: Item, model: str, reason: str, message: str, **extra) -> dict:
    return {**_base(item, model), **extra, "pred_choice": None, "correct_choice": item.correct_choice,
            "correct": False, "error": reason, "message": message}


def _block_records(mufun, items: list[Item], model: str, settings: Settings, pool):
    """Records for one block of items, as they complete."""
    good = [it for it in items if it.error is None]
    for it in items:
        if it.error is not None:
            yield error_record(it, model, it.error, it.message)
    if not good:
        return
    with tempfile.TemporaryDirectory(prefix="mufun-eval-") as tmp:
        reqs = [{"id": k, "prompt": it.prompt, "audio": audio_file(it, Path(tmp), settings), "time": it.time_seg}
                for k, it in enumerate(good)]
        scored = {}
        if settings.mode in ("likelihood", "both"):
            for r in mufun.iter_results([dict(q, candidates=[o for _, o in good[q["id"]].options]) for q in reqs],
                                        score=True, ordered=False):
                scored[r.id] = r
        if settings.mode == "likelihood":
            for k, it in enumerate(good):
                r = scored[k]
                if r.error is not None:
                    yield error_record(it, model, r.error, f"{it.id}: {r.message}")
                    continue
                rec = _likelihood(it, r)
                yield {**_base(it, model), "raw_response": rec["raw"], "pred_choice": rec["likelihood_choice"],
                       "correct_choice": it.correct_choice, "correct": rec["likelihood_correct"],
                       "scores": rec["scores"]}
            return
        pending = collections.deque()
        for r in mufun.iter_results(reqs, max_new_tokens=settings.max_new_tokens, temperature=0.0, ordered=False):
            it = good[r.id]
            if r.error is not None:
                yield error_record(it, model, r.error, f"{it.id}: {r.message}")
                continue
            extra = {}
            if settings.mode == "both":
                s = scored[r.id]
                if s.error is not None:
                    yield error_record(it, model, s.error, f"{it.id}: {s.message}", raw_response=r.text)
                    continue
                lk = _likelihood(it, s)
                extra = {"scores": lk["scores"], "likelihood_choice": lk["likelihood_choice"],
                         "likelihood_correct": lk["likelihood_correct"]}
            if settings.extractor is None:
                yield _answer(it, model, r.text, regex_extract(r.text, it.options), extra)
            else:
                pending.append(pool.submit(_extract_remote, settings.extractor, it, model, r.text, extra))
                while pending and pending[0].done():
                    yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _likelihood(it: Item, r) -> dict:
    totals = [float(s.total) for s in r.scores]
    best = max(range(len(totals)), key=totals.__getitem__)
    letter = it.options[best][0]
    return {"raw": it.options[best][1], "scores": totals, "likelihood_choice": letter,
            "likelihood_correct": letter == it.correct_choice}


def _answer(it: Item, model: str, raw: str, pred, extra: dict) -> dict:
    return {**_base(it, model), "raw_response": raw, "pred_choice": pred, "correct_choice": it.correct_choice,
            "correct": pred == it.correct_choice, **extra}


def _extract_remote(extractor, it: Item, model: str, raw: str, extra: dict) -> dict:
    try:
        pred = extractor.extract(it.choices_text, raw)
    except ExtractorError as e:
        return error_record(it, model, "extractor_failed", f"{it.id}: {e}", raw_response=raw, **extra)
    return _answer(it, model, raw, pred, extra)


def _items_at(src: Source, indices: list[int]) -> list[Item]:
    want = set(indices)
    lo, hi = min(indices), max(indices) + 1
    return [it for it in src.items(lo, hi) if it.index in want]


def evaluate(models: Sequence[tuple[str, Callable[[], Any] | Any]], sources: dict[str, Source], out_dir, *,
             settings: Settings | None = None, shard: tuple[int, int] | None = None,
             retry_errors: bool = True, answers_format: str = "jsonl") -> dict:
    """Answer every planned item with every model into ``out_dir/answers.jsonl`` (or its shard;
    ``answers_format`` csv / parquet: ``answers.csv`` / ``answers.parquet``).
    ``models`` are (name, MuFun or a zero-argument loader); loaders run one at a time. Returns
    ``{"records": [...this run's planned records, in plan order], "results": results.json or None
    (shards), "errors": n}``; unsharded runs also write results.json/.md/.png."""
    settings = settings or Settings()
    if settings.mode not in MODES:
        raise ValueError(f"mode={settings.mode!r} must be one of {MODES}")
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = plan(sources, shard)
    answers = answers_file(shard_path(out_dir / f"answers.{answers_format}", shard), retry_errors=retry_errors)
    names = [n for n, _ in models]
    try:
        for name, model in models:
            todo = [t for t in items if (name, t[2]) not in answers]
            if len(todo) < len(items):
                log.info("%s: %d of %d items already in %s", name, len(items) - len(todo), len(items), answers.path)
            if not todo:
                continue
            mufun = model() if callable(model) else model
            by_subset = collections.defaultdict(list)
            for sub, i, _ in todo:
                by_subset[sub].append(i)
            bar = tqdm(total=len(todo), desc=name, unit="item", disable=not settings.progress, dynamic_ncols=True)
            with bar, ThreadPoolExecutor(max(1, settings.extract_workers)) as pool:
                for sub, idx in by_subset.items():
                    for a in range(0, len(idx), settings.block):
                        block = _items_at(sources[sub], idx[a:a + settings.block])
                        for rec in _block_records(mufun, block, name, settings, pool):
                            answers.write(rec)
                            bar.update(1)
            del mufun
    finally:
        answers.close()
    keys = [(n, rid) for n in names for _, _, rid in items]
    missing = [k for k in keys if k not in answers]
    if missing:  # every planned item is written above, so this is a bug, not bad input
        raise RuntimeError(f"{len(missing)} answers missing from {answers.path}, e.g. {missing[:3]}")
    planned = {_key(list(k)) for k in keys}
    answers.sort(keys + [json.loads(k) for k in answers.done if k not in planned])  # others' records kept, last
    records = [answers.done[_key(list(k))] for k in keys]
    results = None
    if shard is None or shard[1] == 1:
        results = summarize(records, names, list(sources), settings.mode)
        write_reports(results, out_dir)
    return {"records": records, "results": results, "errors": sum(r.get("error") is not None for r in records),
            "path": answers.path}


def merge(names: Sequence[str], sources: dict[str, Source], out_dir, mode: str = "generate") -> dict:
    """Join ``answers.shard-I-of-N.jsonl`` into ``answers.jsonl`` in plan order and write the
    reports; a missing shard or item is a ValueError naming it."""
    out_dir = Path(out_dir)
    shards = sorted(out_dir.glob("answers.shard-*-of-*.jsonl"))
    if not shards:
        raise ValueError(f"{out_dir}: no answers.shard-I-of-N.jsonl files to merge")
    counts = {p.name.split("-of-")[1].split(".")[0] for p in shards}
    if len(counts) != 1:
        raise ValueError(f"{out_dir}: shard files of different counts N {sorted(counts)}; keep one set")
    n = int(counts.pop())
    have = {int(p.name.split(".shard-")[1].split("-of-")[0]) for p in shards}
    if have != set(range(n)):
        raise ValueError(f"{out_dir}: shards {sorted(set(range(n)) - have)} of {n} are missing")
    done = {}
    for p in shards:
        done.update(answers_file(p, retry_errors=False).done)
    keys = [(m, rid) for m in names for _, _, rid in plan(sources)]
    missing = [k for k in keys if _key(list(k)) not in done]
    if missing:
        raise ValueError(f"{len(missing)} (model, id) answers are in no shard, e.g. {missing[:3]}: finish the shard "
                         "runs first")
    records = [done[_key(list(k))] for k in keys]
    tmp = out_dir / ".answers.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    tmp.replace(out_dir / "answers.jsonl")
    results = summarize(records, list(names), list(sources), mode)
    write_reports(results, out_dir)
    return {"records": records, "results": results, "errors": sum(r.get("error") is not None for r in records)}
