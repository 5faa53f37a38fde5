"""MuFun JSON / JSONL datasets -> tokenised samples with their audio chunks.

A record is ``{"id", "audio": str | [str], "time": [s, e] | [[s, e] | null, ...] (optional),
"conversations": [{"from": "human" | "gpt", "value": ...}, ...]}``. Audio paths are relative
to ``audio_root`` unless absolute; without one, to the dataset file's folder
(:func:`audio_root_for`, the one rule of training and ``validate``).

A bad record never stops a run: it is skipped with a one-line warning that names its id and the
reason, and counted per reason in :class:`SkipCounter`. The reasons are:
- ``malformed_record``: not an object, no id, or no conversations;
- ``bad_conversation``: does not start with human, or does not alternate;
- ``audio_tag_mismatch``: the number of ``<audio>`` tags differs from the number of audios;
- ``bad_time``: a segment list that does not fit the audios;
- the :class:`~mufun_jax.audio.AudioError` reasons: ``missing_file``, ``unsupported_extension``,
  ``undecodable``, ``empty_audio``, ``segment_out_of_range`` and ``bad_segment``;
- ``label_mismatch``: the reference label algorithm would mask the whole sample.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tqdm.auto import tqdm

from mufun_jax import audio
from mufun_jax.errors import InputError
from mufun_jax.data.templates import AUDIO_TAG, Template, TemplateError, turns_from_conversations

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    id: str
    input_ids: list[int]  # one -200 per audio
    labels: list[int]
    chunks: list[list[np.ndarray]]  # per audio, its 16 kHz 30 s chunks in time order

    @property
    def chunks_per_audio(self) -> list[int]:
        return [len(c) for c in self.chunks]


class SkipCounter(collections.Counter):
    """Skipped samples by reason; ``skip`` logs the one-line warning."""

    def skip(self, sample_id, reason: str, message: str) -> None:
        self[reason] += 1
        log.warning("skipping sample %s: %s: %s", sample_id, reason, message)

    def report(self) -> str:
        if not self:
            return "no samples skipped"
        return "\n".join(f"{reason:24s} {n}" for reason, n in sorted(self.items()))


class SampleError(InputError):
    """A record that cannot become a sample; ``reason`` is its skip-counter key."""


def read_records(path: str | Path, counter: SkipCounter | None = None) -> list:
    """A JSON list, or JSONL (one record a line; an unparsable line is counted, not fatal)."""
    path = Path(path)
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e.msg} at line {e.lineno}, column {e.colno}); "
                             "fix the file, or use JSONL so that one bad line is skipped instead") from e
    records = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if counter is not None:
                counter.skip(f"{path.name}:{n}", "malformed_record", f"invalid JSON ({e.msg})")
    return records


def segments(time, n_audios: int) -> list:
    """Normalise ``time`` to one segment (or None) per audio."""
    if time is None:
        return [None] * n_audios
    is_pair = (isinstance(time, (list, tuple)) and len(time) == 2
               and all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in time))
    if is_pair:  # a single [start, end]: the reference's case, [0, 30.0] included
        if n_audios != 1:
            raise SampleError("bad_time", f"one segment {list(time)} given for {n_audios} audios; give one per audio")
        return [list(time)]
    if isinstance(time, (list, tuple)) and len(time) == n_audios:
        return [None if t is None else list(t) for t in time]
    raise SampleError("bad_time", f"time={time!r} must be [start, end] or one [start, end] / null per audio")


def prepare(record, *, template: Template, tokenizer, audio_root: str | Path | None = None) -> Sample:
    """One record -> a :class:`Sample`; raises ``SampleError`` (with a reason) for bad input. With
    ``tokenizer=None`` everything but tokenisation is checked (``validate`` without a tokenizer);
    the sample then has no token ids."""
    if not isinstance(record, dict) or "conversations" not in record:
        raise SampleError("malformed_record", "expected an object with 'conversations'")
    sample_id = record.get("id")
    try:
        turns = turns_from_conversations(record["conversations"])
    except TemplateError as e:
        raise SampleError(e.reason, str(e)) from e
    paths = record.get("audio") or []
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not all(isinstance(p, str) for p in paths):
        raise SampleError("malformed_record", f"audio={record.get('audio')!r} must be a path or a list of paths")
    n_tags = template.render(turns).count(AUDIO_TAG)
    if n_tags != len(paths):
        raise SampleError("audio_tag_mismatch", f"{n_tags} <audio> tags for {len(paths)} audios")
    segs = segments(record.get("time"), len(paths))
    ids, labels = [], []
    if tokenizer is not None:
        try:
            ids, labels = template.encode(turns, tokenizer)
        except TemplateError as e:
            raise SampleError(e.reason, str(e)) from e
    chunks = []
    for p, seg in zip(paths, segs):
        full = Path(p) if audio_root is None or Path(p).is_absolute() else Path(audio_root) / p
        try:
            chunks.append(audio.chunk(audio.load_audio(full, seg)))
        except audio.AudioError as e:
            raise SampleError(e.reason, str(e)) from e
    return Sample(str(sample_id), ids, labels, chunks)


@dataclasses.dataclass(frozen=True)
class Prepare:
    """Picklable ``record -> Sample | (id, reason, message)`` for loader worker processes; the skip
    is returned rather than counted so that counts are kept in the main process."""

    template: Template
    tokenizer: object
    audio_root: str | None = None

    def __call__(self, record):
        sample_id = record.get("id", "?") if isinstance(record, dict) else "?"
        try:
            return prepare(record, template=self.template, tokenizer=self.tokenizer, audio_root=self.audio_root)
        except SampleError as e:
            return (sample_id, e.reason, str(e))


def iter_samples(records: Iterable, *, template: Template, tokenizer, audio_root=None,
                 counter: SkipCounter | None = None) -> Iterator[Sample]:
    """Good samples in order; bad ones are skipped, warned about and counted."""
    counter = SkipCounter() if counter is None else counter
    prep = Prepare(template, tokenizer, None if audio_root is None else str(audio_root))
    for record in records:
        item = prep(record)
        if isinstance(item, Sample):
            yield item
        else:
            counter.skip(*item)


def audio_root_for(dataset: str | Path, audio_root: str | Path | None = None) -> str:
    """The folder that a dataset's relative audio paths are resolved against: ``audio_root`` when
    given, else the dataset file's own folder (so a dataset and its audio can move together).
    Training and ``validate`` both use this, so a file that validates also trains."""
    return str(audio_root) if audio_root is not None else str(Path(dataset).parent)


def validate(path: str | Path, *, template: Template, tokenizer=None, audio_root=None, seq_len: int | None = None,
             tokens_per_chunk: int = 300, progress: bool = True) -> tuple[int, SkipCounter]:
    """Scan a dataset: (number of good samples, skip counts by reason). Structure, audio files,
    segments and tag counts are always checked; with a ``tokenizer`` also the templates' label
    masks and, with ``seq_len``, whether each sample fits a row of that many tokens once its audio
    is expanded (``too_long``). Relative audio paths resolve as in training (:func:`audio_root_for`)."""
    counter = SkipCounter()
    records = read_records(path, counter)
    audio_root = audio_root_for(path, audio_root)
    good = 0
    for s in tqdm(iter_samples(records, template=template, tokenizer=tokenizer, audio_root=audio_root,
                               counter=counter), total=len(records), desc="validate", disable=not progress):
        if tokenizer is not None and seq_len is not None:
            n = len(s.input_ids) - len(s.chunks) + tokens_per_chunk * sum(s.chunks_per_audio)
            if n > seq_len:
                counter.skip(s.id, "too_long", f"{n} tokens with its audio expanded, more than seq_len={seq_len}")
                continue
        good += 1
    return good, counter


def dataset_tokenizer(path: str | Path):
    """``AutoTokenizer`` from a checkpoint or tokenizer directory (never remote code). A path that
    is not a directory is an error naming it here, rather than Hugging Face's complaint about a
    malformed hub repo id; a directory without tokenizer files is reported with its path too."""
    from transformers import AutoTokenizer, PretrainedConfig  # heavy; only where a tokenizer is loaded

    if not Path(path).is_dir():
        why = "not a directory" if Path(path).exists() else "no such directory"
        raise FileNotFoundError(errno.ENOENT, f"{why} (expected a tokenizer or checkpoint directory)", str(path))
    kw = {}
    cfg = Path(path) / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("model_type") == "tinyllava":
        # transformers does not know TinyLLaVA's config: without this it warns that the directory's
        # model type does not match; the tokenizer files name their own class
        kw["config"] = PretrainedConfig()
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:  # no tokenizer files, or files it cannot read
        raise OSError(f"{path}: cannot load a tokenizer there ({' '.join(str(e).split())})") from e


