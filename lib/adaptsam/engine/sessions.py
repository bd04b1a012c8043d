"""Per-client interaction state, owned by a `Session` and changed only through its operations.

A session is one client's work on one object (label) of one image under one model version: its
clicks, the low-res logits of its last answer on each prompted slice (the next correction's mask
prompt), its last result volume, and a short undo history. Two clients never share one.

Slicer and OHIF send the whole click list with every request; `begin` maps that list onto the
operations: clicks (or a box) added to the session's prompts continue it; a dropped click
undoes steps until the session holds a strict subset of the request's prompts, so re-decoding
gives exactly what the user saw before that click; `reset_state` starts over. The store is bounded by memory (least
recently used sessions go first) and by age.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import RequestError
from .preprocess import put_slice

Click = Tuple[int, int, int]
SliceKey = Tuple[int, int]  # (axis, slice index)
Roi = Tuple[Tuple[int, int], ...]  # per-axis inclusive ranges
MAX_STEPS = 16  # undo depth
MAX_SESSION_CLICKS = 256


@dataclass
class Step:
    """What one request changed, to undo it: the clicks before it and the logits it replaced
    (the whole map when the answer replaced every slice, else the slices it changed)."""

    foreground: Tuple[Click, ...]
    background: Tuple[Click, ...]
    roi: Optional[Roi]
    logits_before: Dict[SliceKey, Optional[torch.Tensor]]
    replaced_all: bool
    # the result's planes a slice-mode step overwrote (bit-packed): a correction that cleared the
    # slices beyond it (rejection.py) changes more than the slice that is decoded again on undo
    planes_before: Dict[SliceKey, Tuple[Tuple[int, int], np.ndarray]] = field(default_factory=dict)


@dataclass
class Session:
    foreground: List[Click] = field(default_factory=list)
    background: List[Click] = field(default_factory=list)
    roi: Optional[Roi] = None  # the box the last answer was given
    logits: Dict[SliceKey, torch.Tensor] = field(default_factory=dict)  # every slice of the last answer
    result: Optional[np.ndarray] = None  # last label volume (slice mode edits it in place)
    prompts: Dict = field(default_factory=dict)  # the request that produced `result`, for saving
    history: List[Step] = field(default_factory=list)
    updated: float = field(default_factory=time.time)
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    # ---- operations ---------------------------------------------------------------------------

    def begin(self, foreground: Sequence[Click], background: Sequence[Click], roi: Optional[Roi] = None,
              reset: bool = False) -> bool:
        """Take a request's full prompt (click lists and box); True when it continues the session
        (the previous logits then go into the decoder), False when it starts afresh. A request
        continues when it keeps the session's box (or adds one) and its clicks, and adds some."""
        if len(foreground) + len(background) > MAX_SESSION_CLICKS:
            raise RequestError(f"{len(foreground) + len(background)} clicks in one session; at most "
                               f"{MAX_SESSION_CLICKS} (send reset_state to start over)", status_code=413)
        if reset:
            self.reset()
            return False
        fg, bg = Counter(foreground), Counter(background)  # multisets: a click may be repeated
        roi = _as_roi(roi)
        while self._prompted and not self._strictly_within(fg, bg, roi):
            if not self.undo():
                self.clear_clicks()
        return self._prompted

    def undo(self) -> bool:
        """Go back to the state before the last step; False when there is nothing to undo."""
        if not self.history:
            return False
        step = self.history.pop()
        self.foreground, self.background, self.roi = list(step.foreground), list(step.background), step.roi
        if self.result is not None:
            for (axis, index), (shape, bits) in step.planes_before.items():
                put_slice(self.result, axis, index, np.unpackbits(bits, count=shape[0] * shape[1]).reshape(shape))
        if step.replaced_all:
            self.logits = dict(step.logits_before)
        else:
            for key, before in step.logits_before.items():
                if before is None:
                    self.logits.pop(key, None)
                else:
                    self.logits[key] = before
        return True

    def reset(self) -> None:
        self.clear_clicks()
        self.result = None
        self.prompts = {}

    def clear_clicks(self) -> None:
        self.foreground, self.background, self.roi = [], [], None
        self.logits.clear()
        self.history.clear()

    def record(self, foreground: Sequence[Click], background: Sequence[Click], roi: Optional[Roi],
               logits: Dict[SliceKey, torch.Tensor], result: np.ndarray, prompts: Dict, replaces_all: bool,
               planes_before: Optional[Dict[SliceKey, np.ndarray]] = None) -> None:
        """The answer to a request: becomes the state the next correction continues from.
        `logits`: the answer's low-res logits per slice; `replaces_all` when the answer is a
        new volume (volume mode), not an edit of some slices (slice mode); `planes_before`: the
        (rows, cols) planes of the result that an edit overwrote, which undo puts back."""
        before = dict(self.logits) if replaces_all else {key: self.logits.get(key) for key in logits}
        planes = {key: (plane.shape, np.packbits(plane > 0)) for key, plane in (planes_before or {}).items()}
        self.history.append(Step(tuple(self.foreground), tuple(self.background), self.roi, before, replaces_all, planes))
        del self.history[:-MAX_STEPS]
        self.foreground, self.background, self.roi = list(foreground), list(background), _as_roi(roi)
        if replaces_all:
            self.logits = dict(logits)
        else:
            self.logits.update(logits)
        self.result = result
        self.prompts = prompts
        self.updated = time.time()

    def previous_logits(self, slice_key: SliceKey) -> Optional[torch.Tensor]:
        return self.logits.get(slice_key)

    # ---- accounting ---------------------------------------------------------------------------

    @property
    def _prompted(self) -> bool:
        return bool(self.foreground or self.background or self.roi is not None)

    def _strictly_within(self, fg: Counter, bg: Counter, roi: Optional[Roi]) -> bool:
        mine_fg, mine_bg = Counter(self.foreground), Counter(self.background)
        if self.roi is not None and self.roi != roi:
            return False
        return mine_fg <= fg and mine_bg <= bg and (mine_fg, mine_bg, self.roi) != (fg, bg, roi)

    @property
    def nbytes(self) -> int:
        tensors = {id(t): t for t in self.logits.values()}
        for step in self.history:
            tensors.update((id(t), t) for t in step.logits_before.values() if t is not None)
        n = sum(t.numel() * t.element_size() for t in tensors.values())
        n += sum(bits.nbytes for step in self.history for _, bits in step.planes_before.values())
        return n + (self.result.nbytes if self.result is not None else 0)


def _as_roi(roi) -> Optional[Roi]:
    return None if roi is None else tuple(tuple(int(v) for v in r) for r in roi)


SessionKey = Tuple[str, str, str, str]  # (client, image, label, model)


class SessionStore:
    def __init__(self, max_bytes: int = 1 << 30, ttl_s: float = 3600.0):
        self.max_bytes = int(max_bytes)
        self.ttl_s = ttl_s
        self._sessions: "OrderedDict[SessionKey, Session]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, client: str, image: str, label: str, model: str) -> Session:
        key = (client, image, label, model)
        with self._lock:
            self._expire(time.time())
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session()
            self._sessions.move_to_end(key)
            session.updated = time.time()
            return session

    def commit(self, session: Session) -> None:
        """After a session grew: evict least recently used others until the store fits."""
        with self._lock:
            total = sum(s.nbytes for s in self._sessions.values())
            for key in list(self._sessions):
                if total <= self.max_bytes:
                    break
                if self._sessions[key] is not session:
                    total -= self._sessions.pop(key).nbytes

    def latest(self, client: str, image: str) -> Optional[Session]:
        """The client's most recently used session on `image` (any label or model)."""
        with self._lock:
            found = [s for (c, i, _, _), s in self._sessions.items() if c == client and i == image and s.prompts]
            return max(found, key=lambda s: s.updated) if found else None

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self._sessions.items() if now - s.updated > self.ttl_s]:
            del self._sessions[key]

    def stats(self) -> Dict[str, int]:
        with self._lock:
            return {"sessions": len(self._sessions), "bytes": sum(s.nbytes for s in self._sessions.values()),
                    "max_bytes": self.max_bytes}

    def __len__(self) -> int:
        return len(self._sessions)
