"""A least-recently-used cache bounded in bytes: the engine keeps encoded audio and prompt-prefix
KV entries in two of them, so a long tagging run holds a fixed amount of memory however many songs
it sees."""

from __future__ import annotations

import collections

import jax


def _nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


class LRUCache:
    """Least-recently-used values, bounded by their total bytes; an entry larger than the bound is
    not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._d: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key) -> bool:  # no hit or miss counted, no recency change
        return key in self._d

    def get(self, key):
        if key not in self._d:
            self.misses += 1
            return None
        self.hits += 1
        self._d.move_to_end(key)
        return self._d[key][0]

    def stats(self) -> dict:
        """Lookups that found their value (``hits``) or not (``misses``), and what is held now."""
        return {"hits": self.hits, "misses": self.misses, "entries": len(self._d), "bytes": self.bytes}

    def put(self, key, value) -> None:
        n = _nbytes(value)
        if key in self._d:
            self.bytes -= self._d.pop(key)[1]
        if n > self.max_bytes:
            return
        while self._d and self.bytes + n > self.max_bytes:
            self.bytes -= self._d.popitem(last=False)[1][1]
        self._d[key] = (value, n)
        self.bytes += n
