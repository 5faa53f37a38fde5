"""One engine loop for every client: HTTP handlers submit requests, one thread runs the engine.

Why a thread and a queue: the engine (:meth:`mufun_jax.engine.Generator.stream`) is a continuous
batch that pulls requests from an iterable whenever a slot frees. The loop hands it a feed that
takes from a thread-safe queue: it blocks while the engine is idle and says "nothing new yet"
(``None``) while slots are busy, so requests from any number of connections join the same batch,
and the same audio sent by different clients is encoded once (the engine's content-keyed cache).
Tokens flow back through each submission's asyncio queue, on the event loop's thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from mufun_jax.serve.messages import ServeError

log = logging.getLogger(__name__)


class Submission:
    """One engine request (one choice of an HTTP request) and where its events go: ``("tokens",
    ids, logprobs)``, ``("done", GenerationOutput)`` or ``("error", message)``, each tagged with
    ``choice``, into ``events`` (shared by the choices of one HTTP request)."""

    def __init__(self, request, choice: int, events: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.request, self.choice, self.events, self.loop = request, choice, events, loop
        self.index: int | None = None
        self.cancelled = False
        self.created = time.perf_counter()
        self.first_token: float | None = None

    def push(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (self.choice,) + event)


class EngineLoop:
    """Runs ``generator.stream`` on a thread over everything submitted. ``max_queue`` bounds the
    requests waiting for a slot; beyond it :meth:`submit` raises a 429 :class:`ServeError`."""

    def __init__(self, generator, *, max_queue: int, metrics=None):
        self.gen, self.max_queue, self.metrics = generator, int(max_queue), metrics
        self.queue: queue.Queue = queue.Queue()
        self.lock = threading.Lock()
        self.in_flight = 0  # submitted and not finished (queued, waiting or in a slot)
        self.running = 0  # handed to the engine and not finished: engine thread only
        self.by_index: dict[int, Submission] = {}
        self.next_index = 0
        self.stopping = False
        self.tokens_done = 0
        self.aborted = 0  # requests whose slot was freed early (their client went away)
        self.thread = threading.Thread(target=self._run, name="mufun-engine", daemon=True)

    # -- the handlers' side ---------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float | None = None) -> None:
        self.stopping = True
        self.thread.join(timeout)

    @property
    def waiting(self) -> int:
        """Requests without a decode slot yet."""
        return max(self.in_flight - self.gen.batch_size, 0)

    def submit(self, subs: list[Submission]) -> None:
        with self.lock:
            if self.stopping:
                raise ServeError(503, "the server is shutting down", type_="server_error")
            if self.in_flight + len(subs) > self.gen.batch_size + self.max_queue:
                raise ServeError(429, f"the queue is full ({self.waiting} requests waiting, --max-queue "
                                      f"{self.max_queue}); retry shortly", type_="rate_limit_error",
                                 headers={"Retry-After": "1"})
            self.in_flight += len(subs)
        for s in subs:
            self.queue.put(s)

    def cancel(self, subs: list[Submission]) -> None:
        """The client went away: drop what has not started, free the slots of what has."""
        for s in subs:
            s.cancelled = True
            if s.index is not None:
                self.gen.cancel(s.index)

    # -- the engine thread ----------------------------------------------------------------------

    def _feed(self):
        while True:
            busy = self.running > 0
            try:
                sub = self.queue.get_nowait() if busy else self.queue.get(timeout=0.2)
            except queue.Empty:
                if busy:
                    yield None  # nothing new: the engine keeps decoding
                elif self.stopping:
                    return
                continue
            if sub.cancelled:
                self._finished(sub)
                continue
            sub.index = self.next_index
            self.next_index += 1
            self.by_index[sub.index] = sub
            self.running += 1
            yield sub.request

    def _on_tokens(self, index: int, ids: list, logprobs: list) -> None:
        sub = self.by_index.get(index)
        if sub is None:
            return
        if sub.first_token is None:
            sub.first_token = time.perf_counter()
            if self.metrics is not None:
                self.metrics.ttft.observe(sub.first_token - sub.created)
        self.tokens_done += len(ids)
        if self.metrics is not None:
            self.metrics.tokens.inc(len(ids))
        sub.push("tokens", ids, logprobs)

    def _finished(self, sub: Submission) -> None:
        with self.lock:
            self.in_flight -= 1

    def _run(self) -> None:
        while not (self.stopping and self.queue.empty() and self.running == 0):
            try:
                for index, out in self.gen.stream(self._feed(), on_tokens=self._on_tokens):
                    sub = self.by_index.pop(index)
                    self.running -= 1
                    self._finished(sub)
                    self.aborted += out.finish_reason == "abort"
                    sub.push("done", out)
            except Exception as e:  # the engine failed: fail what it held, then serve on
                log.exception("engine loop failed; failing %d requests", len(self.by_index))
                for sub in self.by_index.values():
                    self._finished(sub)
                    sub.push("error", f"{type(e).__name__}: {e}")
                self.by_index.clear()
                self.running = 0
                self.gen._cache = None  # it may have been donated to the failed call
