"""Host-side half of the audio splice: expand each ``<audio>`` placeholder (-200) to
``tokens_per_chunk x chunks`` slots and build the static-shape arrays the model takes.

Follows the reference's ``prepare_inputs_labels_for_multimodal``: the i-th placeholder of a
sample takes the i-th audio's chunks, in time order; audio slots get label -100; then the
sequence is truncated to ``max_length`` (keeping the head) and right-padded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from mufun_jax.config import IGNORE_INDEX, IMAGE_TOKEN_INDEX


@dataclasses.dataclass
class SpliceSample:
    """One tokenised sample: ids with one -200 per audio, and how many 30 s chunks each audio has."""

    input_ids: Sequence[int]
    chunks_per_audio: Sequence[int] = ()
    labels: Sequence[int] | None = None


def expand_placeholders(input_ids, chunks_per_audio, *, tokens_per_chunk: int, chunk_offset: int = 0, labels=None,
                        image_token_index: int = IMAGE_TOKEN_INDEX, ignore_index: int = IGNORE_INDEX):
    """Returns (ids, labels, slots) as int32 arrays; ``slots[j]`` indexes the flattened
    (chunks x tokens_per_chunk) audio embeddings for audio positions and is -1 elsewhere."""
    ids = np.asarray(input_ids, dtype=np.int64)
    lab = ids.copy() if labels is None else np.asarray(labels, dtype=np.int64)
    if lab.shape != ids.shape:
        raise ValueError(f"labels length {lab.shape[0]} != input_ids length {ids.shape[0]}")
    where = np.flatnonzero(ids == image_token_index)
    if len(where) != len(chunks_per_audio):
        raise ValueError(
            f"the sample has {len(where)} <audio> placeholders ({image_token_index}) but {len(chunks_per_audio)} "
            "audios; each audio needs exactly one placeholder"
        )
    for c in chunks_per_audio:
        if int(c) < 1:
            raise ValueError(f"chunks_per_audio={list(chunks_per_audio)}: every audio has at least one chunk")
    out_ids, out_lab, out_slots = [], [], []
    start, chunk = 0, chunk_offset
    for pos, n in zip(where, chunks_per_audio):
        out_ids.append(ids[start:pos])
        out_lab.append(lab[start:pos])
        out_slots.append(np.full(pos - start, -1))
        width = int(n) * tokens_per_chunk
        out_ids.append(np.full(width, image_token_index))
        out_lab.append(np.full(width, ignore_index))
        out_slots.append(chunk * tokens_per_chunk + np.arange(width))
        chunk += int(n)
        start = pos + 1
    out_ids.append(ids[start:])
    out_lab.append(lab[start:])
    out_slots.append(np.full(len(ids) - start, -1))
    cat = lambda xs: np.concatenate(xs).astype(np.int32)
    return cat(out_ids), cat(out_lab), cat(out_slots)


def collate(samples: Sequence[SpliceSample], *, num_chunks: int, tokens_per_chunk: int, max_length: int,
            pad_token_id: int, pad_to: int | None = None, image_token_index: int = IMAGE_TOKEN_INDEX,
            ignore_index: int = IGNORE_INDEX) -> dict[str, np.ndarray]:
    """Expand, truncate to ``max_length`` and right-pad a batch.

    ``num_chunks`` is the number of mel chunks that go with the batch (the first dim of
    ``mel``); the samples' chunk counts must add up to it. Returns int32 arrays of shape
    (batch, pad_to or longest): input_ids, labels, audio_slots, positions (0..T-1) and
    segment_ids (1 on real tokens, 0 on padding), plus lengths (batch,).
    """
    total = sum(int(c) for s in samples for c in s.chunks_per_audio)
    if total != num_chunks:
        raise ValueError(
            f"the samples' audios have {total} chunks in all, but {num_chunks} mel chunks were given; "
            "pass every chunk of every audio, in sample and placeholder order"
        )
    rows, offset = [], 0
    for s in samples:
        ids, lab, slots = expand_placeholders(
            s.input_ids, s.chunks_per_audio, tokens_per_chunk=tokens_per_chunk, chunk_offset=offset, labels=s.labels,
            image_token_index=image_token_index, ignore_index=ignore_index)
        offset += sum(int(c) for c in s.chunks_per_audio)
        rows.append((ids[:max_length], lab[:max_length], slots[:max_length]))
    longest = max(len(r[0]) for r in rows)
    width = longest if pad_to is None else pad_to
    if width < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sample ({longest} tokens after expansion)")
    b = len(rows)
    out = {
        "input_ids": np.full((b, width), pad_token_id, np.int32),
        "labels": np.full((b, width), ignore_index, np.int32),
        "audio_slots": np.full((b, width), -1, np.int32),
        "positions": np.broadcast_to(np.arange(width, dtype=np.int32), (b, width)).copy(),
        "segment_ids": np.zeros((b, width), np.int32),
        "lengths": np.zeros((b,), np.int32),
    }
    for i, (ids, lab, slots) in enumerate(rows):
        n = len(ids)
        out["input_ids"][i, :n] = ids
        out["labels"][i, :n] = lab
        out["audio_slots"][i, :n] = slots
        out["segment_ids"][i, :n] = 1
        out["lengths"][i] = n
    return out
