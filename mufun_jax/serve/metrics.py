"""Prometheus metrics of the server (prometheus-client, its own registry per app)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, gen):
        self.gen, self.registry = gen, CollectorRegistry()
        r = self.registry
        self.requests = Counter("mufun_requests", "Chat completion requests by outcome (HTTP status, or aborted)",
                                ["outcome"], registry=r)
        self.tokens = Counter("mufun_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("mufun_time_to_first_token_seconds", "From queueing to the first token", registry=r,
                              buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.queue = Gauge("mufun_queue_length", "Requests waiting for a decode slot", registry=r)
        self.busy = Gauge("mufun_busy_slots", "Decode slots in use", registry=r)
        self.slots = Gauge("mufun_slots", "Decode slots", registry=r)
        self.rate = Gauge("mufun_generated_tokens_per_second", "Tokens per second since the last scrape", registry=r)
        self.cache = Gauge("mufun_cache", "Audio and prefix cache counters", ["cache", "kind"], registry=r)
        self.slots.set(gen.batch_size)
        self._last = (time.perf_counter(), 0)
        self.engine = None

    def bind(self, engine) -> None:
        self.engine = engine

    def render(self) -> bytes:
        e = self.engine
        if e is not None:
            self.queue.set(e.waiting)
            self.busy.set(min(e.in_flight, self.gen.batch_size))
            now, n = time.perf_counter(), e.tokens_done
            t0, n0 = self._last
            if now - t0 > 1e-3:
                self.rate.set((n - n0) / (now - t0))
            self._last = (now, n)
        for name, st in self.gen.cache_stats().items():
            for kind in ("hits", "misses", "used", "reused", "computed", "bytes"):
                if kind in st:
                    self.cache.labels(cache=name, kind=kind).set(st[kind])
        return generate_latest(self.registry)
