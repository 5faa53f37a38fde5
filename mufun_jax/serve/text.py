"""An answer's text as its tokens arrive: streamed deltas whose concatenation is the final text.

The final text is :meth:`MuFun.decode`'s (special tokens dropped, whitespace stripped), the same
as an offline answer. While streaming, text that could still change is held back: trailing
whitespace (the final strip may remove it), a partial UTF-8 character (decoded as U+FFFD), and
the last characters that could begin a stop string. A stop string ends the answer before it.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, mufun, stops: list[str]):
        self.mufun, self.stops = mufun, list(stops)
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.sent = ""
        self.text = ""
        self.reason: str | None = None
        self.stopped = False  # a stop string appeared
        self.finished = False
        self._cut: str | None = None

    def _decode(self) -> str:
        return self.mufun.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()

    def add(self, ids: list[int], logprobs: list[float]) -> tuple[str, tuple[list, list]]:
        """Take new tokens; returns (text that is now safe to send, (the new ids, their log-probs))."""
        self.ids += [int(t) for t in ids]
        self.logprobs += [float(x) for x in logprobs]
        new = ([int(t) for t in ids], [float(x) for x in logprobs])
        if self.finished:
            return "", new
        text = self._decode()
        hold = 0
        if self.stops:
            hits = [text.find(s) for s in self.stops if s in text]
            if hits:
                self.stopped, self._cut = True, text[:min(hits)].strip()
                return "", new
            hold = max(len(s) for s in self.stops) - 1
        safe = text.rstrip()
        safe = safe[:max(len(safe) - hold, 0)] if hold else safe
        while safe.endswith("\ufffd"):
            safe = safe[:-1]
        return self._emit(safe), new

    def _emit(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def finish(self, reason: str) -> str:
        """The answer is complete; returns the rest of its text."""
        if self.stopped:
            final, self.reason = self._cut, "stop"
        else:
            final, self.reason = self.mufun.decode(self.ids, reason), ("stop" if reason == "stop" else "length")
        self.text, self.finished = final, True
        delta = final[len(self.sent):] if final.startswith(self.sent) else ""
        self.sent = final
        return delta

    def take_new(self) -> tuple[list, list]:
        return [], []
