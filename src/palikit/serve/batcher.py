"""Asyncio micro-batcher: concurrent requests are gathered into one model call.

Requests wait in one bounded FIFO. When the model is free, the batcher takes the oldest request and
every queued request with the same key (the same generation options) up to `max_batch_size`; if
that batch is not full it waits at most `max_wait_ms` (counted from the oldest request's arrival)
for more. The model call runs in ONE worker thread, so the event loop keeps accepting requests,
and the model (whose engine keeps a static KV cache) is never entered by two threads. While a batch
runs, new requests queue up, so under load batches fill by themselves.

Streaming generations are jobs with key None: they run alone, on the same thread, in queue order.

The batcher knows nothing about HTTP or images: `run_batch(key, payloads) -> results` is given.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("palikit.serve")


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full, retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Stopped(Exception):
    """The server is shutting down."""


@dataclass(eq=False)
class Job:
    key: Hashable | None
    payload: Any
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    deadline: float = math.inf


class MicroBatcher:
    def __init__(self, run_batch: Callable[[Hashable, list[Any]], list[Any]], *, max_batch_size: int = 16,
                 max_wait_ms: float = 5.0, max_queue: int = 256,
                 on_batch: Callable[[int, float], None] | None = None,
                 on_depth: Callable[[int], None] | None = None):
        if max_batch_size < 1 or max_queue < 1:
            raise ValueError("max_batch_size and max_queue must be >= 1")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1e3
        self.max_queue = max_queue
        self.on_batch = on_batch or (lambda n, s: None)
        self.on_depth = on_depth or (lambda n: None)
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="palikit-model")
        self._queue: collections.deque[Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._batch_s = 0.05  # moving average of one model call, for Retry-After
        self.running = 0      # jobs in the model call right now
        self._current: list[Job] = []
        self.stopped = False

    # ------------------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="palikit-batcher")

    async def stop(self) -> None:
        self.stopped = True
        for job in list(self._queue) + self._current:
            if not job.future.done():
                job.future.set_exception(Stopped())
        self._queue.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        return max(1, math.ceil((len(self._queue) / self.max_batch_size + 1) * self._batch_s))

    # ------------------------------------------------------------------------------ submit
    async def submit(self, key: Hashable | None, payload: Any, timeout_s: float | None = None) -> Any:
        """Queue one request and wait for its result. Raises QueueFull at once when the queue is
        full, asyncio.TimeoutError past `timeout_s` (queue wait included), Stopped on shutdown, or
        whatever the model call raised for this request."""
        if self.stopped or self._wake is None:
            raise Stopped()
        if len(self._queue) >= self.max_queue:
            raise QueueFull(self.retry_after())
        fut = asyncio.get_running_loop().create_future()
        job = Job(key, payload, fut)
        if timeout_s is not None:
            job.deadline = job.enqueued + timeout_s
        self._queue.append(job)
        self.on_depth(len(self._queue))
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        finally:
            if not fut.done():
                fut.cancel()  # timed out or the client went away: skip it if still queued

    # ------------------------------------------------------------------------------ loop
    def _take(self) -> list[Job]:
        """The oldest live job plus queued jobs with the same key, up to max_batch_size."""
        now = time.perf_counter()
        while self._queue:
            head = self._queue[0]
            if head.future.done():
                self._queue.popleft()
            elif head.deadline < now:
                self._queue.popleft()
                head.future.set_exception(asyncio.TimeoutError())
            else:
                break
        if not self._queue:
            return []
        head = self._queue.popleft()
        batch = [head]
        if head.key is not None:
            keep = collections.deque()
            for job in self._queue:
                if len(batch) < self.max_batch_size and job.key == head.key and not job.future.done():
                    batch.append(job)
                else:
                    keep.append(job)
            self._queue = keep
        self.on_depth(len(self._queue))
        return batch

    def _ready(self) -> int:
        """How many jobs the head's batch would have right now."""
        head = self._queue[0]
        if head.key is None:
            return self.max_batch_size
        n = 0
        for job in self._queue:
            if job.key == head.key and not job.future.done():
                n += 1
                if n >= self.max_batch_size:
                    break
        return n

    async def _loop(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            # wait (bounded) for the head's batch to fill
            while self._queue and self._ready() < self.max_batch_size:
                left = self._queue[0].enqueued + self.max_wait_s - time.perf_counter()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            self.running = len(batch)
            self._current = batch
            t0 = time.perf_counter()
            try:
                outcomes = await loop.run_in_executor(self.executor, self._run, batch[0].key,
                                                      [j.payload for j in batch])
            except Exception as e:  # noqa: BLE001 - executor gone (shutdown)
                outcomes = [e] * len(batch)
            dt = time.perf_counter() - t0
            self.running = 0
            self._current = []
            self._batch_s = 0.8 * self._batch_s + 0.2 * dt
            self.on_batch(len(batch), dt)
            for job, out in zip(batch, outcomes):
                if job.future.done():
                    continue
                if isinstance(out, BaseException):
                    job.future.set_exception(out)
                else:
                    job.future.set_result(out)

    def _run(self, key: Hashable | None, payloads: list[Any]) -> list[Any]:
        """In the model thread: one call for the batch; if it fails, each request alone, so one bad
        request cannot fail the others. Exceptions are returned, not raised."""
        if key is None:  # a streaming job: the payload is the work
            try:
                return [payloads[0]()]
            except Exception as e:  # noqa: BLE001
                return [e]
        try:
            results = self.run_batch(key, payloads)
            if len(results) != len(payloads):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(payloads)} requests")
            return results
        except Exception as e:  # noqa: BLE001
            if len(payloads) == 1:
                return [e]
            log.info("batch of %d failed (%s); running its requests one by one", len(payloads), type(e).__name__)
        out: list[Any] = []
        for p in payloads:
            try:
                out.append(self.run_batch(key, [p])[0])
            except Exception as e:  # noqa: BLE001
                out.append(e)
        return out
