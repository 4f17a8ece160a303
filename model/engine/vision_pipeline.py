"""The vision pipeline: frames are encoded on their own thread while the language model decodes.

On a CPU the vision tower of a newly arrived frame is a few milliseconds of dense compute, the
decode step a few milliseconds of mostly op dispatch: run on one thread they add up; on two threads
(each with one intra-op thread, so each owns a core) they overlap, and a frame's image tokens are
usually ready by the time its row has finished closing the previous caption. The measurements are
in docs/engine.md.

Jobs are (row, ticket, frame); the encoder preprocesses and encodes a list of frames; a result carries the ticket back, so the engine discards the
result of a frame whose row was closed or resubmitted meanwhile. All pending jobs are encoded as
one batch. The thread only reads model weights (the vision tower and the CASA k/v projections), so
it needs no lock with the decode thread; the engine writes the K/V into the cache itself.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from casa_live.model.engine.scheduler import FrameEncoding, Scheduler, TokenEvent
from casa_live.model.engine.threads import name_this_thread

log = logging.getLogger("casa.vision")

Encoder = Callable[[list[Any]], list[FrameEncoding]]


@dataclass
class Encoded:
    row: int
    ticket: int
    encoding: FrameEncoding | None  # None when encoding failed
    error: BaseException | None = None


class FrameEncoder:
    """Frames -> FrameEncodings: the processor's preprocessing, then the vision tower and the CASA
    image K/V (Runner.encode), one vision batch per patch grid (a camera's frames all share one, so
    batching is kept; aspect-preserving resizes make grids differ). Reads weights only, so the
    vision thread can run it."""

    def __init__(self, processor: Any, encode: Callable[..., Any], merge: int) -> None:
        self.processor, self._encode, self.merge = processor, encode, merge

    def process(self, image: Any) -> tuple[torch.Tensor, tuple[int, int]]:
        """(H, W, 3) uint8 -> patches (P, C*p*p) and their patch grid."""
        return self.processor.process(image)

    def encode_images(self, images: list[Any]) -> list[FrameEncoding]:
        return self.encode_patches([self.processor.process(im) for im in images])

    def encode_patches(self, frames: list[tuple[torch.Tensor, tuple[int, int]]]) -> list[FrameEncoding]:
        out: list[FrameEncoding | None] = [None] * len(frames)
        groups: dict[tuple[int, int], list[int]] = {}
        for j, (_, grid) in enumerate(frames):
            groups.setdefault(grid, []).append(j)
        m = self.merge
        for grid, idx in groups.items():
            tokens, kv = self._encode(torch.stack([frames[j][0] for j in idx]), grid)  # (n, N, hidden)
            for n, j in enumerate(idx):
                frame_kv = None if kv is None else (kv[0][:, n], kv[1][:, n])  # (Lc, Hkv, N, D) x 2
                out[j] = FrameEncoding(tokens[n], frame_kv, (grid[0] // m, grid[1] // m))
        return out  # type: ignore[return-value]


class VisionPipeline:
    def __init__(
        self, encode: Encoder, threads: int = 1, notify: Callable[[], None] | None = None, max_batch: int = 4
    ) -> None:
        self._encode = encode
        self._threads = threads
        self.notify = notify  # called (on the vision thread) after results are added
        self.max_batch = max_batch
        self._cv = threading.Condition()
        self._jobs: collections.deque[tuple[int, int, Any]] = collections.deque()
        self._done: list[Encoded] = []
        self._busy = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="casa-vision", daemon=True)
        self._thread.start()

    def submit(self, row: int, ticket: int, frame: Any) -> None:
        """Queue a frame (whatever the encoder takes: here an (H, W, 3) image) for `row`."""
        with self._cv:
            self._jobs.append((row, ticket, frame))
            self._cv.notify_all()

    def take(self) -> list[Encoded]:
        """Results ready so far (non-blocking)."""
        with self._cv:
            done, self._done = self._done, []
        return done

    def wait(self, timeout: float) -> None:
        """Block until a result is ready, nothing is pending, or the timeout passes."""
        with self._cv:
            self._cv.wait_for(lambda: self._done or not (self._jobs or self._busy), timeout)

    @property
    def has_results(self) -> bool:
        """Results wait to be taken."""
        with self._cv:
            return bool(self._done)

    @property
    def pending(self) -> bool:
        with self._cv:
            return bool(self._jobs or self._busy or self._done)

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(5.0)

    def _encode_batch(self, batch: list[tuple[int, int, Any]]) -> list[Encoded]:
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                encoded = self._encode([f for _, _, f in batch])
        except Exception as exc:  # reported per frame; the thread keeps serving
            log.exception("vision tower failed on %d frames", len(batch))
            return [Encoded(row, ticket, None, exc) for row, ticket, _ in batch]
        dt = (time.perf_counter() - t0) / len(batch)
        for enc in encoded:
            enc.seconds = dt
        return [Encoded(row, ticket, enc) for (row, ticket, _), enc in zip(batch, encoded)]

    @property
    def queued(self) -> int:
        """Frames waiting that no thread has taken yet (a backlog another thread could help with)."""
        with self._cv:
            return len(self._jobs)

    def help(self) -> bool:
        """Encode one batch of queued frames on the calling thread, beside the vision thread: the
        decode thread does this when it has nothing else to do, which halves a burst's backlog (a
        fleet of streams opening at once sends every first frame together: docs/engine.md,
        "Frame 0 sets the max lag"). Returns whether it took any frame."""
        with self._cv:
            if self._stop or not self._jobs:
                return False
            batch = self._take()
        self._finish(batch, self._encode_all(batch))
        return True

    def _take(self) -> list[tuple[int, int, Any]]:
        """Up to a batch of queued jobs, now being encoded (lock held)."""
        batch = [self._jobs.popleft() for _ in range(min(self.max_batch, len(self._jobs)))]
        self._busy += len(batch)
        return batch

    def _encode_all(self, batch: list[tuple[int, int, Any]]) -> list[Encoded]:
        out = self._encode_batch(batch)
        if len(batch) > 1 and any(e.error is not None for e in out):
            # one bad frame must not cost the others theirs: encode them one by one
            out = [e for job in batch for e in self._encode_batch([job])]
        return out

    def _finish(self, batch: list[tuple[int, int, Any]], out: list[Encoded]) -> None:
        with self._cv:
            self._done.extend(out)
            self._busy -= len(batch)
            self._cv.notify_all()
        if self.notify is not None:
            self.notify()

    def _run(self) -> None:
        name_this_thread("casa-vision")
        torch.set_num_threads(self._threads)  # per thread: this one owns its core
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._stop or self._jobs)
                if self._stop:
                    return
                batch = self._take()
            self._finish(batch, self._encode_all(batch))


def collect_encodings(
    scheduler: Scheduler, frames: FrameEncoder, pipeline: VisionPipeline | None, involved: set[int]
) -> list[TokenEvent]:
    """Hand finished encodings to the scheduler at the start of a tick: the vision thread's, or
    (without one) those of the frames that can start now, encoded here. Their rows join
    `involved` (the rows a failing tick names). Returns the error events of failed frames."""
    if pipeline is not None:
        done = pipeline.take()
        involved.update(d.row for d in done)
        events = [scheduler.encoded(d.row, d.ticket, d.encoding) for d in done]
        return [ev for ev in events if ev is not None]
    rows = scheduler.to_encode()
    involved.update(rows)
    if rows:
        t0 = time.perf_counter()
        pending = [scheduler.row(i).pending for i in rows]
        encs = frames.encode_patches([(p.patches, p.patch_grid) for p in pending])
        share = (time.perf_counter() - t0) / len(rows)
        for i, p, enc in zip(rows, pending, encs):
            enc.seconds = share
            scheduler.encoded(i, p.ticket, enc)
    return []
