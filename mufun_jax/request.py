"""One inference request, from its record to what the engine takes: the accepted record forms
(:func:`parse_request`), the outcome record (:class:`Result`, what ``infer.py`` writes), audio
loading and cropping (:func:`load_request_audio`) and the audio cache keys (by content, or the
request's own ``audio_id``). :mod:`mufun_jax.api` runs them through the engine."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mufun_jax import audio as audio_lib
from mufun_jax.errors import InputError


class RequestError(InputError):
    """A request that cannot be served; ``reason`` is a short key (``missing_file``, ``too_long``, ...)."""


@dataclasses.dataclass
class Result:
    """The outcome of one request. ``error`` (a reason key) and ``message`` are set when it failed."""

    id: Any
    text: str | None = None  # the answer; in score mode, the candidate with the highest total
    token_ids: list[int] | None = None  # generated ids, the stop token included when finish_reason == "stop"
    logprobs: list[float] | None = None  # log p of each generated token under the untempered model
    finish_reason: str | None = None  # "stop" | "length"
    candidates: list | None = None  # score mode: the candidates, as given
    scores: list | None = None  # score mode: one generate.ScoreOutput per candidate
    error: str | None = None
    message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> dict:
        """The record ``infer.py`` writes."""
        if self.error is not None:
            return {"id": self.id, "error": self.error, "message": self.message}
        if self.scores is None:
            return {"id": self.id, "answer": self.text, "finish_reason": self.finish_reason,
                    "num_tokens": len(self.token_ids or ())}
        best = max(range(len(self.scores)), key=lambda j: self.scores[j].total)
        return {"id": self.id, "answer": self.text, "answer_index": best,
                "scores": [{"candidate": c, "total": s.total, "mean": s.mean,
                            "token_logprobs": [float(x) for x in s.token_logprobs]}
                           for c, s in zip(self.candidates, self.scores)]}


@dataclasses.dataclass
class _Prepared:
    index: int
    id: Any
    prompt_text: str = ""
    input_ids: list[int] = dataclasses.field(default_factory=list)
    audios: list = dataclasses.field(default_factory=list)  # per audio: list of 16 kHz 1-D chunks
    audio_keys: list | None = None  # per audio: the caller's ("audio_id", id, segment), or a hash of the samples
    seed: int = 0
    max_new_tokens: int | None = None
    candidates: list | None = None
    length: int = 0  # prompt length after audio expansion (plus the longest candidate when scoring)
    error: RequestError | None = None
    raw: tuple = ()  # (audio, time, audio_root) until the audio is loaded
    audio_ids: list | None = None  # the request's own ids of its audios, if it gave them
    candidates_ids: list | None = None


def _segments(time, n_audios: int) -> list:
    """``None`` | ``[s, e]`` (one audio) | ``[[s, e] | None, ...]`` (one per audio) -> one entry per audio."""
    from mufun_jax.data.dataset import segments

    try:
        return segments(time, n_audios)
    except InputError as e:
        raise RequestError(e.reason, str(e)) from None


def parse_request(req, index: int = 0) -> dict:
    """Normalise one request to ``{"id", "prompt", "audio": [...], "time", "seed", "max_new_tokens",
    "candidates"}``. Accepted forms:

    - a string: the prompt, no audio;
    - ``{"prompt": str, "audio": path | [paths] | None, "time": segs, ...}`` (``audio_files`` and
      ``segs`` are accepted as aliases, as in ``chat``);
    - the training-data schema ``{"id", "audio", "time", "conversations": [{"from": "human",
      "value": prompt}, ...]}``: the first human turn is the prompt.

    Optional keys: ``id`` (default: the index), ``seed``, ``max_new_tokens``, ``candidates``, and
    ``audio_id`` (a string per audio: the caller's name for that audio, which then keys the audio
    cache instead of a hash of its samples; the same id must always mean the same audio).
    An audio is a file path (relative ones resolve against ``audio_root``) or a 1-D float array of
    16 kHz samples."""
    if isinstance(req, str):
        return {"id": index, "prompt": req, "audio": [], "time": None, "seed": None, "max_new_tokens": None,
                "candidates": None, "audio_id": None}
    if not isinstance(req, dict):
        raise RequestError("malformed_record", f"request {index}: expected a string or an object, got "
                                               f"{type(req).__name__}")
    rid = req.get("id", index)
    prompt = req.get("prompt")
    if prompt is None and "conversations" in req:
        conv = req["conversations"]
        human = [m for m in conv if isinstance(m, dict) and m.get("from") == "human"] if isinstance(conv, list) else []
        if not human:
            raise RequestError("bad_conversation", f"request {rid}: 'conversations' has no human turn")
        prompt = human[0].get("value")
    if not isinstance(prompt, str):
        raise RequestError("malformed_record", f"request {rid}: needs a string 'prompt' or a 'conversations' list")
    audio = req.get("audio", req.get("audio_files"))
    if audio is None:
        audio = []
    elif isinstance(audio, (str, os.PathLike)) or (isinstance(audio, np.ndarray) and audio.ndim == 1):
        audio = [audio]
    else:
        audio = list(audio)
    if not all(isinstance(a, (str, os.PathLike, np.ndarray)) for a in audio):
        raise RequestError("malformed_record", f"request {rid}: 'audio' must be a path or a list of paths")
    cands = req.get("candidates")
    if cands is not None and not (isinstance(cands, (list, tuple)) and all(
            isinstance(c, str) or (isinstance(c, (list, tuple)) and all(isinstance(t, (int, np.integer)) for t in c))
            for c in cands)):
        raise RequestError("malformed_record", f"request {rid}: 'candidates' must be a list of strings")
    ids = req.get("audio_id")
    if ids is not None:
        ids = [ids] if isinstance(ids, (str, int)) else ids
        if not (isinstance(ids, (list, tuple)) and len(ids) == len(audio)
                and all(isinstance(i, (str, int)) and not isinstance(i, bool) for i in ids)):
            raise RequestError("malformed_record", f"request {rid}: 'audio_id' must be a string (one audio) or a "
                                                   f"list of strings, one per audio ({len(audio)})")
    seed, mnt = req.get("seed"), req.get("max_new_tokens")
    for name, v in (("seed", seed), ("max_new_tokens", mnt)):
        if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0):
            raise RequestError("malformed_record", f"request {rid}: '{name}' must be a non-negative int")
    return {"id": rid, "prompt": prompt, "audio": audio, "time": req.get("time", req.get("segs")), "seed": seed,
            "max_new_tokens": mnt, "candidates": None if cands is None else list(cands),
            "audio_id": None if ids is None else list(ids)}


def _audio_keys(audios: list[list[np.ndarray]], audio_ids, time) -> list:
    """The engine's cache key of each audio: the request's own ``audio_id`` (with the segment), else
    a hash of the decoded, cropped samples. Keys by content, not path: one song reached by two
    paths (or sent twice as bytes) is encoded once; a changed file under the same path is not
    confused with the old one."""
    import hashlib

    if audio_ids is not None:
        segs = _segments(time, len(audios))
        return [("audio_id", str(i), None if s is None else tuple(float(x) for x in s))
                for i, s in zip(audio_ids, segs)]
    keys = []
    for chunks in audios:
        h = hashlib.blake2b(digest_size=16)
        for c in chunks:
            h.update(np.ascontiguousarray(c, np.float32).tobytes())
            h.update(b"|")
        keys.append(("samples", h.hexdigest()))
    return keys


def load_request_audio(audio: Sequence, time, audio_root=None) -> list[list[np.ndarray]]:
    """Decode (and crop) each audio of a request into its 30 s chunks of 16 kHz samples."""
    segs = _segments(time, len(audio))
    out = []
    for a, seg in zip(audio, segs):
        try:
            if isinstance(a, np.ndarray):
                x = np.asarray(a, np.float32)
                if x.ndim != 1:
                    raise audio_lib.AudioError("undecodable", f"an audio array must be 1-D 16 kHz samples, "
                                                              f"got shape {x.shape}")
                x = audio_lib.crop(x, audio_lib.SAMPLE_RATE, seg, "audio array")
                if x.size == 0:
                    raise audio_lib.AudioError("empty_audio", "audio array: no samples")
            else:
                p = Path(a)
                if audio_root is not None and not p.is_absolute():
                    p = Path(audio_root) / p
                x = audio_lib.load_audio(p, seg)
        except audio_lib.AudioError as e:
            raise RequestError(e.reason, str(e)) from None
        out.append(audio_lib.chunk(x))
    return out
