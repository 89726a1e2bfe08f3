"""The server's async front of the continuous-batching engine: thread hops and the per-request timeout.

Every request (task endpoints, chat, streaming chat) goes to `PaliGemma.submit` in a worker thread
(pixels from the model-size image, then queued on the engine), waits for its generation on the
event loop, and is parsed (boxes, masks) in a worker thread again, so the engine thread only runs
the model and the event loop never blocks. Admission is the engine scheduler's alone: its bound
(`max_slots` decoding + `max_queue` waiting) refuses with `QueueFull` and its Retry-After estimate,
raised by `submit`; the front adds no bound of its own. A request that times out or whose client goes
away is cancelled: dropped from the queue, or its slot freed at the next step. After `stop()` or
`drain()` new requests get `Closed` (shutting down: 503); `drain(grace_s)` (SIGTERM) lets the requests
already running finish for `grace_s` seconds, then ends the rest with `Closed` too, so every client
gets an answer before the process exits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from ..engine import Closed
from ..engine.scheduler import settle_future
from ..tasks.options import PredictOptions

__all__ = ["EngineFront", "Item"]


@dataclass
class Item:
    """One generation request after parsing: what the front runs."""

    image: Any  # model-ready PIL image (`ImageProcessor.model_ready`), or a list of them (frames)
    prompt: str
    prompt_ids: list[int]  # the prompt tokenized once (`PaliGemma.encode_prompt`), length checked
    labels: list[str] | None  # the requested labels, cleaned by the task table
    choices: Any = None  # a closed set of answers to score (`tasks.choices.ChoiceSet`), else None
    constraint: Any = None  # a fresh token constraint for this generation (structured outputs), else None


class EngineFront:
    def __init__(self, pg, *, max_slots: int = 16, max_queue: int = 256,
                 on_done: Callable[[Any, float], None] | None = None):
        if max_slots < 1 or max_queue < 1:
            raise ValueError("max_slots and max_queue must be >= 1")
        self.pg = pg
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.on_done = on_done or (lambda result, seconds: None)
        self.stopped = True
        self._limiter = anyio.CapacityLimiter(4)  # worker threads preparing / parsing at once
        self._waiting: set = set()  # Pendings whose result a request awaits (drain ends them)

    async def start(self) -> None:
        """Give the engine this server's slots and queue bound (a new scheduler when they differ)."""
        engine = getattr(self.pg, "engine", None)
        if engine is not None:
            s = engine.scheduler
            if (s.max_slots, s.max_queue) != (self.max_slots, self.max_queue):
                self.pg.configure_scheduler(max_slots=self.max_slots, max_queue=self.max_queue)
        self.stopped = False

    async def stop(self) -> None:
        self.stopped = True

    def drain(self, grace_s: float) -> None:
        """Stop admitting now; `grace_s` seconds later, end every request still waiting with Closed
        (503 + Retry-After; a streaming chat's error event) and free its slot. Call on the event loop."""
        self.stopped = True
        asyncio.get_running_loop().call_later(max(0.0, grace_s), self._end_waiting)

    def _end_waiting(self) -> None:
        for pending in list(self._waiting):
            settle_future(pending.future, error=Closed("the server shut down before this request finished"))
            pending.cancel()

    @property
    def depth(self) -> int:
        """Requests in the engine waiting for a slot."""
        engine = getattr(self.pg, "engine", None)
        return engine.scheduler.stats()["queued"] if engine is not None else 0

    async def submit(self, item: Item, options: PredictOptions, on_text: Callable[[str], None] | None = None):
        """Queue one generation (pixels made in a worker thread); returns its `Pending`. Raises the
        engine's QueueFull / Closed, or the library's ValueError."""
        if self.stopped:
            raise Closed("the server is shutting down")
        submitted = []

        def work():
            extra = {k: v for k, v in (("choices", item.choices), ("constraint", item.constraint)) if v is not None}
            submitted.append(self.pg.submit(item.image, item.prompt, prompt_ids=item.prompt_ids, labels=item.labels,
                                            options=options, on_text=on_text, **extra))
            return submitted[0]

        try:
            return await anyio.to_thread.run_sync(work, limiter=self._limiter)
        except BaseException:
            for pending in submitted:  # cancelled while it was being queued
                pending.cancel()
            raise

    async def result(self, pending, timeout_s: float | None = None) -> Any:
        """The Result of a submitted generation, parsed in a worker thread; cancelled in the engine
        when it times out (TimeoutError) or its caller goes away."""
        async def wait():
            await asyncio.wrap_future(pending.future)
            return await anyio.to_thread.run_sync(pending.result, limiter=self._limiter)

        self._waiting.add(pending)
        try:
            result = await asyncio.wait_for(wait(), timeout_s)
        except BaseException:
            pending.cancel()  # timed out, client gone, or shutting down: free its slot
            raise
        finally:
            self._waiting.discard(pending)
        self.on_done(result, time.perf_counter() - pending.t_submit)  # queue wait included
        return result

    async def run(self, item: Item, options: PredictOptions, timeout_s: float | None,
                  on_text: Callable[[str], None] | None = None) -> Any:
        """`submit` then `result`, both within `timeout_s`."""
        async def both():
            return await self.result(await self.submit(item, options, on_text))

        return await asyncio.wait_for(both(), timeout_s)
