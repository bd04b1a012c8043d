"""Image-embedding cache shared by every client: bounded by bytes, least recently used out.

Keys name everything an embedding depends on: image (id + content hash), slicing axis, slice
index, backbone, adapter kind and version, and intensity window. A new adapter version therefore
never hits an old entry; `drop_stale` frees those entries early. Values are stored fp16 on the
CPU: half the memory, and the decoder's result is unaffected at mask precision.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch


@dataclass(frozen=True)
class EmbeddingKey:
    image: str  # "<image id>@<content hash>"
    axis: int
    index: int
    model: str  # "<backbone>/<adapter kind>/v<adapter version>"
    window: Tuple[float, float]


class EmbeddingCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: "OrderedDict[EmbeddingKey, torch.Tensor]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: EmbeddingKey) -> Optional[torch.Tensor]:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def __contains__(self, key: EmbeddingKey) -> bool:
        with self._lock:
            return key in self._items

    def put(self, key: EmbeddingKey, embedding: torch.Tensor) -> torch.Tensor:
        """Store `embedding`; returns the stored (fp16, CPU) value."""
        value = embedding.detach().to("cpu", torch.float16).contiguous()
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return value
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
                self.evictions += 1
        return value

    def drop_where(self, predicate: Callable[[EmbeddingKey], bool]) -> int:
        with self._lock:
            doomed = [k for k in self._items if predicate(k)]
            for k in doomed:
                v = self._items.pop(k)
                self._bytes -= v.numel() * v.element_size()
            return len(doomed)

    def count_where(self, predicate: Callable[[EmbeddingKey], bool]) -> int:
        with self._lock:
            return sum(1 for k in self._items if predicate(k))

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_bytes": self.max_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            }
