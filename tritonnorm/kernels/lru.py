"""A bounded cache: what a long run over many shapes keeps (plans, tuned configs)."""

from __future__ import annotations

from collections import OrderedDict


class LRU(OrderedDict):
    """A dict of at most ``size`` entries, evicting the least recently used first (a run over
    thousands of shapes, detection's or sliding-window inference's, keeps the recent ones).

    A hit costs nothing while the cache is at most half full: ``get`` is dict's, and a hit
    moves its entry to the end (:meth:`lookup`, or the caller's ``move_to_end`` when
    ``crowded``) only once more than half the bound is in use. Until then nothing can be
    evicted, and an entry still in use is hit, so moved, before eviction reaches it: evicted
    first are those unused since the cache became half full, oldest first."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.crowded = False  # more than half full: hits move their entry to the end

    def lookup(self, key, default=None):
        value = self.get(key, default)
        if value is not default and self.crowded:
            self.move_to_end(key)
        return value

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self.shrink()

    def shrink(self) -> None:
        """Evict down to the bound (after ``size`` changed)."""
        while len(self) > self.size:
            self.popitem(last=False)
        self.crowded = len(self) > self.size // 2

    def clear(self) -> None:
        super().clear()
        self.crowded = False
