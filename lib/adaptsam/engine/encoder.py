"""Slice embeddings on demand, and the rest of the volume in the background.

A request asks for the embedding of the slice it needs; a miss is encoded right there (the
only encoder pass a first click pays). The request then schedules the whole volume, and one
background thread encodes it nearest slices first, so the user's next slices are usually
cached before they are clicked. The worker steps aside while requests are running: it checks
between slices and waits until no request is in flight, so clicks are not slowed by a
volume being encoded for someone else.

3D adapters encode N adjacent slices together (the Conv3d mixes them). Slices are grouped in
consecutive windows [gN, gN+N): every slice is encoded exactly once, so a whole volume costs
one encoder pass per slice, not N. Windows at the volume's end are padded by repeating the
edge slice.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from .cache import EmbeddingCache, EmbeddingKey
from .models import ServingModel
from .predictor import SlicePredictor
from .preprocess import SliceGeometry, plane_shape
from .volume import Volume

logger = logging.getLogger(__name__)


@dataclass
class VolumeJob:
    image: str
    axis: int
    window: Tuple[float, float]
    serving: ServingModel
    volume: Volume
    order: List[int]  # slice indices, nearest to the prompted slice first
    done: int = 0
    started: float = field(default_factory=time.time)
    finished: Optional[float] = None

    @property
    def total(self) -> int:
        return len(self.order)


def window_group(index: int, n: int, depth: int) -> Tuple[List[int], int]:
    """Slices encoded together with `index` (length n, edge-padded) and its position in them."""
    start = (index // n) * n
    group = [min(s, depth - 1) for s in range(start, start + n)]
    return group, index - start


class SliceEncoder:
    def __init__(self, cache: EmbeddingCache):
        self.cache = cache
        self._jobs: Dict[Tuple[str, int, str, Tuple[float, float]], VolumeJob] = {}
        self._lock = threading.Condition()
        self._in_flight = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="adaptsam-encoder", daemon=True)
        self._thread.start()
        # A daemon thread killed inside a torch op aborts the interpreter at exit: let the
        # current slice finish instead.
        atexit.register(self.stop)

    def stop(self, timeout: float = 30.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # ---- foreground -----------------------------------------------------------------------

    @contextlib.contextmanager
    def foreground(self):
        """Mark a request as running: the background worker pauses between slices."""
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1
                self._lock.notify_all()

    @staticmethod
    def key(image: str, axis: int, index: int, serving: ServingModel, window) -> EmbeddingKey:
        return EmbeddingKey(image, axis, int(index), serving.key, (float(window[0]), float(window[1])))

    def geometry(self, serving: ServingModel, volume: Volume, axis: int) -> SliceGeometry:
        rows, cols = plane_shape(volume.shape, axis)
        return SliceGeometry.fit(rows, cols, serving.model.input_size, volume.plane_spacing(axis), volume.display_flips(axis))

    def embedding(self, serving: ServingModel, volume: Volume, image: str, axis: int, index: int, window,
                  ahead: int = 0) -> Tuple[torch.Tensor, bool]:
        """(embedding (1, C, h, w), was_cached) for one slice; computes it on a miss, with the
        slices the caller will need next when it says so: `ahead` (+1 / -1) is the direction a
        propagation walks, and a miss then encodes a whole batch that way (serving.encode_batch)."""
        key = self.key(image, axis, index, serving, window)
        hit = self.cache.get(key)
        if hit is not None:
            return hit[None], True
        depth = volume.shape[axis]
        wanted = [index]
        if ahead:
            wanted += [s for s in range(index + ahead, index + ahead * serving.encode_batch, ahead) if 0 <= s < depth]
        emb = self.prefetch(serving, volume, image, axis, wanted, window, calls=1).get(index)
        if emb is None:  # another request encoded it since the lookup above: take theirs, or encode it
            emb = self.cache.get(key)
            if emb is None:
                emb = self._encode(serving, volume, image, axis, window_group(index, serving.num_slices, depth)[0], window)[index]
        return emb[None], False

    def prefetch(self, serving: ServingModel, volume: Volume, image: str, axis: int, indices, window,
                 calls: Optional[int] = None) -> Dict[int, torch.Tensor]:
        """Encode the slices among `indices` that are not cached (with their windows), in
        batches of serving.encode_batch, at most `calls` batches (the first holds indices[0]);
        returns the embeddings of those it encoded."""
        depth, n = volume.shape[axis], serving.num_slices
        starts = []  # the windows to encode, in the order asked
        for s in indices:
            start = (s // n) * n
            if start not in starts and self.key(image, axis, s, serving, window) not in self.cache:
                starts.append(start)
        per_call = max(1, serving.encode_batch // n)
        result: Dict[int, torch.Tensor] = {}
        for i in range(0, min(len(starts), per_call * (calls or len(starts))), per_call):
            groups = [window_group(start, n, depth)[0] for start in starts[i : i + per_call]]
            result.update(self._encode(serving, volume, image, axis, [s for g in groups for s in g], window))
        return result

    def _encode(self, serving: ServingModel, volume: Volume, image: str, axis: int, slices: List[int], window) -> Dict[int, torch.Tensor]:
        """One encoder call on `slices` (whole windows, in order); each result cached."""
        geom = self.geometry(serving, volume, axis)
        predictor = SlicePredictor(serving.model, serving.device)
        inputs = torch.stack([predictor.model_input(volume.normalized_slice(window, axis, s), geom) for s in slices])
        out = serving.encode(inputs)
        result = {}
        for pos, s in enumerate(slices):
            if s not in result:
                # decode from what the cache holds (fp16), also on a miss: the same click must get
                # the same answer whether or not its slice was cached
                result[s] = self.cache.put(self.key(image, axis, s, serving, window), out[pos])
        return result

    # ---- background -----------------------------------------------------------------------

    def schedule(self, serving: ServingModel, volume: Volume, image: str, axis: int, window, start: int) -> VolumeJob:
        """Encode every slice of the volume in the background, nearest to `start` first."""
        depth = volume.shape[axis]
        order = sorted(range(depth), key=lambda s: (abs(s - start), s))
        jkey = (image, axis, serving.key, (float(window[0]), float(window[1])))
        with self._lock:
            job = self._jobs.get(jkey)
            if job is None or job.finished is not None and self._missing(job):
                job = VolumeJob(image, axis, jkey[3], serving, volume, order)
                self._jobs[jkey] = job
            else:
                job.order = order  # re-prioritise around the newest click
            self._lock.notify_all()
        return job

    def _missing(self, job: VolumeJob) -> bool:
        return any(self.key(job.image, job.axis, s, job.serving, job.window) not in self.cache for s in job.order)

    def forget_model(self, model_key: str) -> List[VolumeJob]:
        """Stop background work for an outdated model version; returns the dropped jobs."""
        with self._lock:
            doomed = [k for k, j in self._jobs.items() if j.serving.key == model_key]
            return [self._jobs.pop(k) for k in doomed]

    def _next_work(self) -> Optional[Tuple[VolumeJob, int]]:
        for job in list(self._jobs.values()):
            if job.finished is not None:
                continue
            for s in job.order:
                if self.key(job.image, job.axis, s, job.serving, job.window) not in self.cache:
                    return job, s
            job.done = job.total
            job.finished = time.time()
        return None

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._stopping:
                        return
                    if self._in_flight == 0:
                        work = self._next_work()
                        if work is not None:
                            break
                    self._lock.wait(timeout=1.0)
            job, index = work
            try:
                ahead = [s for s in job.order[job.order.index(index):] if s != index][: job.serving.encode_batch - 1]
                self.prefetch(job.serving, job.volume, job.image, job.axis, [index] + ahead, job.window, calls=1)
            except Exception:  # a bad volume must not kill the worker
                logger.exception("background encoding of %s slice %s failed", job.image, index)
                with self._lock:
                    job.finished = time.time()
                continue
            with self._lock:
                job.done = sum(
                    1 for s in job.order if self.key(job.image, job.axis, s, job.serving, job.window) in self.cache
                )

    def progress(self) -> List[Dict]:
        with self._lock:
            return [
                {
                    "image": j.image.split("@")[0],
                    "axis": j.axis,
                    "model": j.serving.key,
                    "window": list(j.window),
                    "encoded": j.done,
                    "total": j.total,
                    "state": "done" if j.finished is not None else "encoding",
                    "seconds": round((j.finished or time.time()) - j.started, 1),
                }
                for j in self._jobs.values()
            ]

    def wait_idle(self, timeout: float) -> bool:
        """Block until no background work is left (benchmarks and tests)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self._lock:
                if self._next_work() is None:
                    return True
            time.sleep(0.1)
        return False
