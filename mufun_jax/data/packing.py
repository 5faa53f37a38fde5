"""Static-shape batches: samples packed into rows of a fixed length, with a fixed number of
audio chunks per batch, so the jitted step never sees a new shape.

Several samples share a row (``pack=True``, the training default). ``segment_ids`` number
them 1, 2, ... (0 is padding), ``positions`` restart at 0 for each, and the model attends only
within a segment. ``pack=False`` puts one sample per row (evaluation, inference).

A sample that cannot fit a row or the chunk budget is never silently cut the way the reference
truncates after splicing (which can drop the question). Depending on ``too_long``, it is either
skipped and counted (``skip``), or its audio is shortened at chunk boundaries from the end
(``truncate_audio``, every audio keeping at least one chunk) and skipped only if it still does
not fit.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Iterator

import numpy as np

from mufun_jax import audio
from mufun_jax.config import IGNORE_INDEX
from mufun_jax.data.dataset import Sample, SkipCounter
from mufun_jax.splice import expand_placeholders


@dataclasses.dataclass(frozen=True)
class PackConfig:
    batch_size: int  # rows
    seq_len: int  # tokens per row, audio slots included
    max_chunks: int  # 30 s chunks per batch
    tokens_per_chunk: int = 300
    pack: bool = True
    too_long: str = "skip"  # skip | truncate_audio
    pad_token_id: int = 0

    def __post_init__(self):
        if self.too_long not in ("skip", "truncate_audio"):
            raise ValueError(f"too_long={self.too_long!r} must be 'skip' or 'truncate_audio'")


def expanded_length(sample: Sample, tokens_per_chunk: int) -> int:
    return len(sample.input_ids) - len(sample.chunks) + tokens_per_chunk * sum(sample.chunks_per_audio)


def _fit(sample: Sample, cfg: PackConfig) -> Sample | None:
    """The sample itself, a version with fewer trailing chunks, or None if it cannot fit."""
    def fits(s):
        return expanded_length(s, cfg.tokens_per_chunk) <= cfg.seq_len and sum(s.chunks_per_audio) <= cfg.max_chunks

    if fits(sample):
        return sample
    if cfg.too_long == "skip":
        return None
    chunks = [list(c) for c in sample.chunks]
    while True:
        longest = max(range(len(chunks)), key=lambda i: (len(chunks[i]), i), default=None)
        if longest is None or len(chunks[longest]) <= 1:
            return None
        chunks[longest].pop()
        trimmed = dataclasses.replace(sample, chunks=chunks)
        if fits(trimmed):
            return trimmed


class _Batch:
    def __init__(self, cfg: PackConfig):
        self.cfg = cfg
        self.rows: list[list[Sample]] = [[] for _ in range(cfg.batch_size)]
        self.used = [0] * cfg.batch_size
        self.chunks = 0

    def try_add(self, s: Sample) -> bool:
        n, c = expanded_length(s, self.cfg.tokens_per_chunk), sum(s.chunks_per_audio)
        if self.chunks + c > self.cfg.max_chunks:
            return False
        for r in range(self.cfg.batch_size):
            if (self.rows[r] and not self.cfg.pack) or self.used[r] + n > self.cfg.seq_len:
                continue
            self.rows[r].append(s)
            self.used[r] += n
            self.chunks += c
            return True
        return False

    @property
    def empty(self) -> bool:
        return not any(self.rows)

    def arrays(self) -> dict[str, np.ndarray]:
        cfg = self.cfg
        b, t = cfg.batch_size, cfg.seq_len
        out = {
            "input_ids": np.full((b, t), cfg.pad_token_id, np.int32),
            "labels": np.full((b, t), IGNORE_INDEX, np.int32),
            "audio_slots": np.full((b, t), -1, np.int32),
            "positions": np.zeros((b, t), np.int32),
            "segment_ids": np.zeros((b, t), np.int32),
            "waves": np.zeros((cfg.max_chunks, audio.CHUNK_SAMPLES), np.float32),
            "chunk_mask": np.zeros((cfg.max_chunks,), bool),
        }
        ids_of = []
        chunk = 0
        for r, row in enumerate(self.rows):
            cur = 0
            for k, s in enumerate(row, start=1):
                ids, lab, slots = expand_placeholders(s.input_ids, s.chunks_per_audio,
                                                      tokens_per_chunk=cfg.tokens_per_chunk, chunk_offset=chunk,
                                                      labels=s.labels)
                n = len(ids)
                out["input_ids"][r, cur:cur + n] = ids
                out["labels"][r, cur:cur + n] = lab
                out["audio_slots"][r, cur:cur + n] = slots
                out["positions"][r, cur:cur + n] = np.arange(n)
                out["segment_ids"][r, cur:cur + n] = k
                for per_audio in s.chunks:
                    for c in per_audio:
                        out["waves"][chunk, :len(c)] = c
                        out["chunk_mask"][chunk] = True
                        chunk += 1
                ids_of.append(s.id)
                cur += n
        out["sample_ids"] = np.asarray(ids_of, dtype=object)
        return out


class Packer:
    """Stateful first-fit packing over a sample source: rows fill in arrival order and a batch is
    emitted when the next sample fits nowhere in it; that sample opens the next batch.

    ``resume_state`` is the source state from which reading again reproduces the batches that
    follow the last one emitted (the state just before the held-over sample), which makes a
    checkpointed loader resume at the exact sample.
    """

    def __init__(self, cfg: PackConfig, counter: SkipCounter | None = None, max_consecutive_skips: int | None = None):
        self.cfg = cfg
        self.counter = SkipCounter() if counter is None else counter
        self.pending: Sample | None = None
        self.resume_state = None
        # A source that repeats forever and whose samples are all skipped would loop forever.
        self.max_consecutive_skips = max_consecutive_skips
        self._skips_in_a_row = 0

    def _skipped(self) -> None:
        self._skips_in_a_row += 1
        if self.max_consecutive_skips is not None and self._skips_in_a_row > self.max_consecutive_skips:
            raise ValueError(f"{self._skips_in_a_row} samples in a row were skipped, i.e. no sample in a whole pass "
                             f"over the data is usable. Skipped so far by reason:\n{self.counter.report()}\n"
                             f"If the reason is too_long, raise seq_len (now {self.cfg.seq_len}) or max_chunks "
                             f"(now {self.cfg.max_chunks}).")

    def _admit(self, s: Sample) -> Sample | None:
        fitted = _fit(s, self.cfg)
        if fitted is None:
            self.counter.skip(s.id, "too_long", f"{expanded_length(s, self.cfg.tokens_per_chunk)} tokens / "
                                                f"{sum(s.chunks_per_audio)} chunks do not fit "
                                                f"seq_len={self.cfg.seq_len}, max_chunks={self.cfg.max_chunks}")
        return fitted

    def next_batch(self, source: Iterator, get_state=None) -> dict[str, np.ndarray] | None:
        """The next batch from ``source`` (samples, or ``(id, reason, message)`` skips), or None at the end."""
        batch = _Batch(self.cfg)
        if self.pending is not None:
            batch.try_add(self.pending)
            self.pending = None
        while True:
            before = get_state() if get_state else None
            try:
                item = next(source)
            except StopIteration:
                self.resume_state = get_state() if get_state else None
                return None if batch.empty else batch.arrays()
            if not isinstance(item, Sample):
                self.counter.skip(*item)
                self._skipped()
                continue
            fitted = self._admit(item)
            if fitted is None:
                self._skipped()
                continue
            self._skips_in_a_row = 0
            if not batch.try_add(fitted):
                self.pending = fitted
                self.resume_state = before
                return batch.arrays()


def pack_batches(samples: Iterable[Sample], cfg: PackConfig, counter: SkipCounter | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
    """All batches of an in-memory sample stream (see :class:`Packer`)."""
    packer, source = Packer(cfg, counter), iter(samples)
    while (batch := packer.next_batch(source)) is not None:
        yield batch


def shift_labels(labels: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
    """Next-token targets that never cross a segment: ``targets[t] = labels[t+1]`` when t and t+1
    belong to the same sample, else -100 (what HF's shifted loss does for one sample per row)."""
    targets = np.full_like(labels, IGNORE_INDEX)
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] != 0)
    targets[:, :-1] = np.where(same, labels[:, 1:], IGNORE_INDEX)
    return targets
