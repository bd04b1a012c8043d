"""Per-client interaction state: which prompts produced the last result, and its logits.

Keyed by (client id, image id, label, model): two clients on the same image never see each
other's clicks. A request continues a session when it keeps every earlier click and adds some
(how Slicer sends its growing point lists); otherwise (a click deleted, `reset_state`) the
session starts over, so removed clicks stop influencing the result.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Dict, Optional, Set, Tuple

import numpy as np
import torch

Click = Tuple[int, int, int]


@dataclass
class Session:
    foreground: Set[Click] = field(default_factory=set)
    background: Set[Click] = field(default_factory=set)
    logits: Dict[Tuple[int, int], torch.Tensor] = field(default_factory=dict)  # (axis, slice) -> low-res
    result: Optional[np.ndarray] = None  # last label volume (slice mode edits it in place)
    prompts: Dict = field(default_factory=dict)  # the request that produced `result`, for saving
    updated: float = field(default_factory=time.time)

    def continues_with(self, foreground: Set[Click], background: Set[Click]) -> bool:
        had = self.foreground or self.background
        return bool(had) and self.foreground <= foreground and self.background <= background


class SessionStore:
    def __init__(self, ttl_s: float = 3600.0, max_sessions: int = 256):
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self._sessions: Dict[Tuple[str, str, str, str], Session] = {}
        self._lock = threading.Lock()

    def get(self, client: str, image: str, label: str, model: str) -> Session:
        key = (client, image, label, model)
        now = time.time()
        with self._lock:
            self._expire(now)
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session()
            session.updated = now
            return session

    def reset(self, client: str, image: str, label: str, model: str) -> Session:
        with self._lock:
            session = self._sessions[(client, image, label, model)] = Session()
            return session

    def latest(self, client: str, image: str) -> Optional[Session]:
        """The client's most recently used session on `image` (any label or model)."""
        with self._lock:
            found = [s for (c, i, _, _), s in self._sessions.items() if c == client and i == image and s.prompts]
            return max(found, key=lambda s: s.updated) if found else None

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.updated > self.ttl_s]:
            del self._sessions[key]
        while len(self._sessions) >= self.max_sessions:
            oldest = min(self._sessions, key=lambda k: self._sessions[k].updated)
            del self._sessions[oldest]

    def __len__(self) -> int:
        return len(self._sessions)
