"""Results kept between runs: merges by the fingerprint of their inputs, and each base model's
sampled trajectories (which do not depend on the merge settings)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Hashable


class LruCache:
    """A small least-recently-used map; entries are dropped when more than ``size`` are kept."""

    def __init__(self, size: int):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        if key not in self._items:
            return None
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def setdefault(self, key: Hashable, factory) -> Any:
        value = self.get(key)
        if value is None:
            value = factory()
            self.put(key, value)
        return value

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


MERGES = LruCache(4)    # (base fingerprint, concepts, settings) -> (MergedLora, MergeReport)
SAMPLES = LruCache(2)   # base fingerprint -> {concept key: samples}
