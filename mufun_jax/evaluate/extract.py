"""Answer extraction: from a model's free-text answer to the letter of one option.

Two extractors, selected with ``--extractor``:

- :func:`regex_extract` (default, offline, deterministic). The first rule that applies wins:
  1. the whole answer is one option letter (``"B"``, ``"(B)"``, ``"B."``, ``"**B**"``);
  2. the answer starts with an option label: ``"B. Jazz ..."``, ``"(B) ..."``, ``"B) ..."``,
     ``"B: ..."``;
  3. it says ``answer is B`` / ``answer: B`` / ``option B`` / ``choice (B)`` (case-insensitive words,
     upper-case letter), naming exactly one letter;
  4. it contains labels ``(B)`` or ``B.`` / ``B)`` (followed by a space or the end) of exactly one
     option letter;
  5. it contains the text of exactly one option (case-insensitive, on word boundaries);
  otherwise ``None`` (counted as wrong, as MuCUE-Bench counts an extractor's "None").
- :class:`OpenAIExtractor`: MuCUE-Bench's own extraction. One user message, the protocol's string
  byte for byte (:func:`protocol_message`), ``temperature`` 0.1 and ``max_tokens`` 32, POSTed to
  ``URL/chat/completions`` of any OpenAI-compatible server, where URL is the base URL as the OpenAI
  client takes it (e.g. ``http://localhost:8000/v1`` for vLLM). By default the body also carries
  ``chat_template_kwargs: {"enable_thinking": false}`` (Qwen3's thinking off, as the protocol runs
  it; ``--extractor-extra-body '{}'`` drops it for servers that reject unknown keys).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

from mufun_jax.evaluate.data import option_text

EXTRACT_TEMPLATE = ("\nextract the choice of A, B, C, D from the following answer.\nIf the answer is not clear, "
                    "return \"None\", otherwise just return the single choice letter.\noptions: {choices_text}\n "
                    "answer: \n{raw_response}\n\n")
DEFAULT_EXTRA_BODY = {"chat_template_kwargs": {"enable_thinking": False}}


def protocol_message(choices_text: str, raw_response: str) -> str:
    """The extraction prompt of MuCUE-Bench's ``extract_single.py``, filled in."""
    return EXTRACT_TEMPLATE.format(choices_text=choices_text, raw_response=raw_response)


def _strip_think(text: str) -> str:
    return re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()


def regex_extract(response: str | None, options) -> str | None:
    """The option letter that ``response`` names, or ``None`` (rules in the module docstring).
    ``options`` is ``[(letter, option as written), ...]``."""
    if not response:
        return None
    letters = [letter for letter, _ in options]
    text = _strip_think(response)
    bare = re.sub(r"^[\s*_`\"'(\[]+|[\s*_`\"'.)\]:,!]+$", "", text)
    if bare in letters:  # 1
        return bare
    m = re.match(r"^[\s*_`\"']*\(?([A-Z])(?:[.):]|\))(?:\s|$|\*)", text)  # 2
    if m and m.group(1) in letters:
        return m.group(1)
    said = {m.group(1) for m in re.finditer(
        r"(?i:\b(?:answer|option|choice)\b)(?:\s+(?i:is|would\s+be|should\s+be))?\s*[:=]?\s*[*_`\"']*\(?([A-Z])\b",
        text)} & set(letters)  # 3
    if len(said) == 1:
        return said.pop()
    labelled = set()
    for m in re.finditer(r"\(([A-Z])\)|(?<![A-Za-z.])([A-Z])[.)](?=\s|$)", text):  # 4
        labelled.add(m.group(1) or m.group(2))
    labelled &= set(letters)
    if len(labelled) == 1:
        return labelled.pop()
    low = text.lower()
    hits = [letter for letter, opt in options if (t := option_text(opt).lower()) and re.search(
        r"(?<!\w)" + re.escape(t) + r"(?!\w)", low)]  # 5
    if len(hits) == 1:
        return hits[0]
    return None


class ExtractorError(RuntimeError):
    """The extraction server cannot be used (down, wrong URL, refused the request)."""


class OpenAIExtractor:
    """MuCUE-Bench's LLM extraction against an OpenAI-compatible server (module docstring).
    :meth:`probe` checks the server before a run; :meth:`extract` retries a failed call
    ``retries`` times (with a short back-off), then raises :class:`ExtractorError`."""

    def __init__(self, url: str, model: str, api_key: str | None = None, *, extra_body: dict | None = None,
                 retries: int = 3, timeout: float = 60.0, backoff: float = 1.0):
        self.url = url.rstrip("/")
        self.model = model
        self.api_key = api_key
        self.extra_body = DEFAULT_EXTRA_BODY if extra_body is None else extra_body
        self.retries = retries
        self.timeout = timeout
        self.backoff = backoff

    def _request(self, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, headers=headers,
                                     method="GET" if body is None else "POST")
        with urllib.request.urlopen(req, timeout=timeout or self.timeout) as r:
            return json.loads(r.read().decode("utf-8"))

    def probe(self) -> None:
        """GET ``URL/models``; raises :class:`ExtractorError` with the URL and the cause when the
        server is down or does not answer like an OpenAI server."""
        try:
            out = self._request("/models", timeout=min(self.timeout, 10.0))
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ExtractorError(f"--extractor-url {self.url}: the extraction server does not answer GET "
                                 f"{self.url}/models ({getattr(e, 'reason', e)}); start it (e.g. vllm serve "
                                 f"Qwen/Qwen3-8B) or fix the URL (the base URL, ending in /v1 for vLLM)") from None
        names = [m.get("id") for m in out.get("data", []) if isinstance(m, dict)] if isinstance(out, dict) else []
        if names and self.model not in names:
            raise ExtractorError(f"--extractor-model {self.model!r}: {self.url} serves {names}")

    def body(self, choices_text: str, raw_response: str) -> dict:
        return {"model": self.model, "messages": [{"role": "user", "content": protocol_message(choices_text,
                                                                                           raw_response)}],
                "temperature": 0.1, "max_tokens": 32, **self.extra_body}

    def extract(self, choices_text: str, raw_response: str) -> str | None:
        """The server's reply, stripped (and without a ``<think>`` block); ``"None"`` -> ``None``."""
        body = self.body(choices_text, raw_response)
        last = None
        for attempt in range(self.retries + 1):
            try:
                out = self._request("/chat/completions", body)
                reply = _strip_think(out["choices"][0]["message"]["content"] or "")
                return None if reply in ("None", "") else reply
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as e:
                last = e
                if attempt < self.retries:
                    time.sleep(self.backoff * (attempt + 1))
        raise ExtractorError(f"extraction failed after {self.retries + 1} tries: {type(last).__name__}: {last}")
