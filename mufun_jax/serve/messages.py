"""OpenAI chat-completion requests, read into what the engine needs: chat turns, audio, sampling.

How a message becomes prompt text (documented in docs/serving.md):
- ``content`` is a string, or a list of parts: ``{"type": "text", "text": ...}``,
  ``{"type": "input_audio", "input_audio": {"data": BASE64, "format": "wav"}}`` and
  ``{"type": "audio_url", "audio_url": {"url": ...}}``;
- the parts are joined in their order with ``"\\n"``, each audio part becoming an ``<audio>`` tag;
- except that a message with exactly one audio part and no ``<audio>`` in its text gets the tag
  first, ``"<audio>\\n" + text``: the rule of ``MuFun.chat``, so MuCUE-Bench's ``[text, input_audio]``
  request gives the same prompt as ``chat(prompt, audio)``;
- system (or developer) text replaces the template's system prompt; user and assistant turns map
  onto the template's ``USER:`` / ``ASSISTANT:`` rounds; the last message must be the user's.

Every problem is a :class:`ServeError` carrying its HTTP status, so the app answers with OpenAI's
error shape: 400 for what the client got wrong, 413 for audio that is too long.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import os
import tempfile
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np

from mufun_jax import audio as audio_lib
from mufun_jax.data.templates import AUDIO_TAG
from mufun_jax.lru import LRUCache

MAX_N = 16  # choices per request: each is a decode slot
MAX_STOP = 4  # OpenAI's limit on stop strings
# Settings OpenAI accepts that this model cannot honour: a non-default value is refused, not ignored.
UNSUPPORTED = {"tools": None, "tool_choice": None, "functions": None, "function_call": None, "logit_bias": None,
               "presence_penalty": 0, "frequency_penalty": 0, "response_format": None, "audio": None,
               "modalities": None, "prediction": None}


class ServeError(Exception):
    """An error answered to the client: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclasses.dataclass(frozen=True)
class AudioPolicy:
    """Where audio may come from, and how long it may be."""

    max_seconds: float = 600.0
    allowed_dir: Path | None = None  # file:// URLs must resolve under it; None refuses file:// URLs
    allow_remote: bool = False  # http(s) URLs
    max_remote_bytes: int = 64 << 20


class DecodedAudio:
    """Decoded samples by a hash of the bytes sent (or a file's path, size and mtime): clients
    asking several questions about one song send it each time, and it is decoded once (as
    ``MuFun.iter_results`` decodes a file once per window). Shared by the request threads."""

    def __init__(self, max_bytes: int = 256 << 20):
        self.cache, self.lock = LRUCache(max_bytes), threading.Lock()

    def get(self, key, decode) -> np.ndarray:
        with self.lock:
            x = self.cache.get(key)
        if x is None:
            x = decode()
            with self.lock:
                self.cache.put(key, x)
        return x


@dataclasses.dataclass
class ChatRequest:
    """A parsed request: ``turns`` as the template takes them, the audios in tag order (16 kHz
    mono samples), and the request's settings."""

    turns: list[tuple[str, str | None]]
    system: str | None
    audios: list[np.ndarray]
    sampling: dict  # SamplingParams fields
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    stop: list[str] = dataclasses.field(default_factory=list)
    seed_given: bool = False


def _check_type(body: dict, name: str, types, what: str):
    v = body.get(name)
    if v is not None and (not isinstance(v, types) or isinstance(v, bool) and bool not in
                          (types if isinstance(types, tuple) else (types,))):
        raise ServeError(400, f"'{name}' must be {what}, got {v!r}", param=name)
    return v


def parse_chat(body, policy: AudioPolicy, max_tokens_cap: int, decoded: DecodedAudio | None = None) -> ChatRequest:
    """Read and check a ``/v1/chat/completions`` body (the model name is checked by the app)."""
    decoded = decoded or DecodedAudio(0)
    if not isinstance(body, dict):
        raise ServeError(400, "the request body must be a JSON object")
    for name, default in UNSUPPORTED.items():
        if body.get(name, default) not in (default, None):
            raise ServeError(400, f"'{name}' is not supported by this server", param=name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ServeError(400, "'messages' must be a non-empty list", param="messages")
    turns, system, audios, user = [], None, [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ServeError(400, f"messages[{i}]: role must be system, developer, user or assistant, got "
                                  f"{m.get('role') if isinstance(m, dict) else m!r}", param=f"messages[{i}]")
        role = m["role"]
        text, found = _content(m.get("content"), i, policy, decoded, allow_audio=role == "user")
        if role in ("system", "developer"):
            if turns or user is not None:
                raise ServeError(400, f"messages[{i}]: a system message must come first", param=f"messages[{i}]")
            system = text if system is None else system + "\n" + text
        elif role == "user":
            user = text if user is None else user + "\n" + text
            audios += found
        else:
            if user is None:
                raise ServeError(400, f"messages[{i}]: an assistant message must follow a user message",
                                 param=f"messages[{i}]")
            turns.append((user, text))
            user = None
    if user is None:
        raise ServeError(400, "the last message must be the user's", param="messages")
    turns.append((user, None))
    return ChatRequest(turns, system, audios, **_settings(body, max_tokens_cap))


def _settings(body: dict, cap: int) -> dict:
    num = (int, float)
    temperature = _check_type(body, "temperature", num, "a number")
    top_p = _check_type(body, "top_p", num, "a number")
    top_k = _check_type(body, "top_k", int, "an integer")  # vLLM's extra sampling parameters
    min_p = _check_type(body, "min_p", num, "a number")
    seed = _check_type(body, "seed", int, "an integer")
    n = _check_type(body, "n", int, "an integer")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= cap):
        raise ServeError(400, f"max_tokens={limit!r} must be an integer in [1, {cap}] (this server's limit)",
                         param="max_tokens")
    if n is not None and not 1 <= n <= MAX_N:
        raise ServeError(400, f"n={n} must be in [1, {MAX_N}]", param="n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise ServeError(400, f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings",
                         param="stop")
    top_logprobs = body.get("top_logprobs")
    if top_logprobs:
        raise ServeError(400, "top_logprobs is not supported (logprobs of the chosen tokens are)",
                         param="top_logprobs")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise ServeError(400, "'stream_options' must be an object", param="stream_options")
    if seed is not None and seed < 0:
        raise ServeError(400, f"seed={seed} must be >= 0", param="seed")
    ignore_eos = _check_type(body, "ignore_eos", bool, "true or false")  # vLLM's: fixed-length answers
    sampling = {"temperature": 1.0 if temperature is None else float(temperature),  # OpenAI's default
                "top_p": 1.0 if top_p is None else float(top_p), "top_k": top_k or 0,
                "min_p": 0.0 if min_p is None else float(min_p),
                "seed": seed if seed is not None else int.from_bytes(os.urandom(4), "little"),
                "max_tokens": limit}
    if ignore_eos:
        sampling["stop_token_ids"] = ()
    return dict(sampling=sampling, n=n or 1, stream=bool(body.get("stream")), logprobs=bool(body.get("logprobs")),
                include_usage=bool(opts.get("include_usage")), stop=stop, seed_given=seed is not None)


def _content(content, i: int, policy: AudioPolicy, decoded: DecodedAudio,
             allow_audio: bool) -> tuple[str, list[np.ndarray]]:
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ServeError(400, f"messages[{i}].content must be a string or a list of parts", param=f"messages[{i}]")
    texts, pieces, audios = [], [], []
    for j, part in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
            pieces.append(part["text"])
        elif kind in ("input_audio", "audio_url"):
            if not allow_audio:
                raise ServeError(400, f"{where}: audio is only accepted in user messages", param=where)
            audios.append(_audio(part, kind, where, policy, decoded))
            pieces.append(AUDIO_TAG)
        else:
            raise ServeError(400, f"{where}: unknown content part {kind!r} (expected text, input_audio or "
                                  f"audio_url)", param=where)
    if len(audios) == 1 and not any(AUDIO_TAG in t for t in texts):
        return AUDIO_TAG + "\n" + "\n".join(texts), audios
    return "\n".join(pieces), audios


def _audio(part: dict, kind: str, where: str, policy: AudioPolicy, decoded: DecodedAudio) -> np.ndarray:
    spec = part.get(kind)
    if kind == "input_audio":
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
            raise ServeError(400, f"{where}: input_audio needs {{'data': BASE64, 'format': ...}}", param=where)
        fmt = str(spec.get("format") or "wav").lower()
        return _decode(_b64(spec["data"], where), fmt, where, policy, decoded)
    url = spec.get("url") if isinstance(spec, dict) else spec
    if not isinstance(url, str) or not url:
        raise ServeError(400, f"{where}: audio_url needs {{'url': ...}}", param=where)
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if ";base64" not in head:
            raise ServeError(400, f"{where}: a data: URL must be base64 (data:audio/wav;base64,...)", param=where)
        fmt = head[5:].split(";")[0].split("/")[-1] or "wav"
        return _decode(_b64(data, where), fmt, where, policy, decoded)
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
        return _file_audio(Path(urllib.parse.unquote(parsed.path)), where, policy, decoded)
    if parsed.scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ServeError(400, f"{where}: remote audio URLs are refused (start the server with "
                                  f"--allow-remote-audio to fetch them)", param=where)
        return _remote_audio(url, where, policy, decoded)
    raise ServeError(400, f"{where}: unsupported audio URL scheme {parsed.scheme!r} (data:, file:// or "
                          f"http(s)://)", param=where)


def _b64(data: str, where: str) -> bytes:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError(400, f"{where}: the audio is not valid base64", param=where) from None
    if not raw:
        raise ServeError(400, f"{where}: the audio is empty", param=where)
    return raw


def _file_audio(path: Path, where: str, policy: AudioPolicy, decoded: DecodedAudio) -> np.ndarray:
    if policy.allowed_dir is None:
        raise ServeError(400, f"{where}: file:// audio is refused (start the server with --allowed-audio-dir DIR)",
                         param=where)
    real, root = path.resolve(), policy.allowed_dir.resolve()
    if not real.is_relative_to(root):
        raise ServeError(400, f"{where}: {path} is outside the allowed audio directory", param=where)
    if not real.is_file():
        raise ServeError(400, f"{where}: no such audio file under the allowed directory: {path}", param=where)
    st = real.stat()
    return _checked(lambda: decoded.get(("file", str(real), st.st_size, st.st_mtime_ns),
                                        lambda: audio_lib.load_audio(real)), where, policy)


def _remote_audio(url: str, where: str, policy: AudioPolicy, decoded: DecodedAudio) -> np.ndarray:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - only with --allow-remote-audio
            raw = r.read(policy.max_remote_bytes + 1)
    except OSError as e:
        raise ServeError(400, f"{where}: cannot fetch {url}: {e}", param=where) from None
    if len(raw) > policy.max_remote_bytes:
        raise ServeError(413, f"{where}: {url} is over {policy.max_remote_bytes} bytes", param=where)
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lstrip(".") or "wav"
    return _decode(raw, suffix, where, policy, decoded)


def _decode(raw: bytes, fmt: str, where: str, policy: AudioPolicy, decoded: DecodedAudio) -> np.ndarray:
    """Decode audio bytes through the same decoders as a file (so an answer equals chat()'s)."""
    if not fmt.isalnum() or len(fmt) > 8:
        raise ServeError(400, f"{where}: bad audio format {fmt!r}", param=where)
    def decode():
        with tempfile.NamedTemporaryFile(suffix="." + fmt) as f:
            f.write(raw)
            f.flush()
            return audio_lib.load_audio(f.name)

    key = ("bytes", fmt, hashlib.blake2b(raw, digest_size=16).hexdigest())
    return _checked(lambda: decoded.get(key, decode), where, policy)


def _checked(load, where: str, policy: AudioPolicy) -> np.ndarray:
    try:
        x = load()
    except audio_lib.AudioError as e:
        raise ServeError(400, f"{where}: undecodable audio ({e})", param=where) from None
    if x.size == 0:
        raise ServeError(400, f"{where}: the audio has no samples", param=where)
    seconds = x.size / audio_lib.SAMPLE_RATE
    if seconds > policy.max_seconds:
        raise ServeError(413, f"{where}: {seconds:.1f} s of audio, more than this server's --max-audio-seconds "
                              f"{policy.max_seconds:g}", param=where)
    return x
