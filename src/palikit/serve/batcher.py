"""The server's async front of the continuous-batching engine.

Every request (task endpoints, chat, streaming chat) goes to `PaliGemma.submit`, which queues it on
the engine; the engine admits it into a free slot between decode steps and frees the slot the
moment it finishes, so short requests never wait for long ones (no batch key: requests with
different options decode together). Preprocessing (resize to the model's size) runs in a worker
thread before the request is queued, and parsing the answer (boxes, masks) in a worker thread after,
so the engine thread only runs the model.

Admission: at most `max_slots + max_queue` requests are in the engine at once (decoding or waiting
for a slot); beyond that `QueueFull` with a Retry-After estimate from the recent service time. A
request that times out or whose client goes away is cancelled: dropped from the queue, or its slot
freed at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import anyio

from ..engine import Closed as Stopped
from ..engine import QueueFull

__all__ = ["EngineFront", "QueueFull", "Stopped"]
log = logging.getLogger("palikit.serve")


class EngineFront:
    def __init__(self, pg, *, max_slots: int = 16, max_queue: int = 256,
                 on_done: Callable[[Any, float], None] | None = None):
        if max_slots < 1 or max_queue < 1:
            raise ValueError("max_slots and max_queue must be >= 1")
        self.pg = pg
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.on_done = on_done or (lambda result, seconds: None)
        self.in_flight = 0
        self.stopped = True
        self._service_s = 0.5  # moving average of one request's time, for Retry-After
        self._limiter = anyio.CapacityLimiter(4)  # worker threads preparing / parsing at once

    async def start(self) -> None:
        configure = getattr(self.pg, "configure_scheduler", None)
        if configure is not None and self.pg.engine.scheduler.max_slots != self.max_slots:
            configure(max_slots=self.max_slots, max_queue=self.max_slots + self.max_queue)
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    @property
    def depth(self) -> int:
        """Requests in the engine beyond the slots (waiting for one)."""
        return max(0, self.in_flight - self.max_slots)

    def retry_after(self) -> int:
        waves = self.in_flight / self.max_slots + 1
        return max(1, math.ceil(waves * self._service_s))

    def admit(self) -> None:
        """Raise QueueFull / Stopped now if a new request cannot be taken."""
        if self.stopped:
            raise Stopped("the server is shutting down")
        if self.in_flight >= self.max_slots + self.max_queue:
            raise QueueFull(self.retry_after())

    async def run(self, image, prompt: str, labels, options: dict, timeout_s: float | None,
                  on_text: Callable[[str], None] | None = None) -> Any:
        """One generation: prepared in a worker thread, decoded by the engine, parsed in a worker
        thread. Raises QueueFull, Stopped, asyncio.TimeoutError, or the library's ValueError."""
        self.admit()
        self.in_flight += 1
        t0 = time.perf_counter()
        submitted = []

        async def generate():
            pending = await anyio.to_thread.run_sync(
                lambda: self.pg.submit(image, prompt, labels=labels, on_text=on_text, **options), limiter=self._limiter)
            submitted.append(pending)
            await asyncio.wrap_future(pending.future)
            return await anyio.to_thread.run_sync(pending.result, limiter=self._limiter)

        try:
            result = await asyncio.wait_for(generate(), timeout_s)
        except BaseException:
            for pending in submitted:
                pending.cancel()  # timed out, client gone, or shutting down: free its slot
            raise
        finally:
            self.in_flight -= 1
        seconds = time.perf_counter() - t0
        self._service_s = 0.9 * self._service_s + 0.1 * seconds
        self.on_done(result, seconds)
        return result
