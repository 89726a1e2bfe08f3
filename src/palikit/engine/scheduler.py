"""Continuous batching: one scheduler thread owns the model and runs every generation.

Requests wait in one bounded FIFO: at most `max_queue` beyond the `max_slots` that decode (the only
admission bound, the HTTP server's too; a refusal carries a Retry-After estimate). Between decode
steps the scheduler admits as many as there are free slots (and `max_prefill_tokens` allows), when
admitting is worth a prefill: fewer than half the slots are decoding, at least `min_admit` requests
can join at once (a quarter of the slots by default), or requests have waited `max_waiting_steps`
decode steps (TGI's `max_waiting_tokens` rule). That keeps one-request prefills from eating the
decode time under load (a prefill costs about a decode step when the model is small), at a cost of
a few steps of first-token latency. Admitted requests' images go through the vision tower as one batch
(cached by content), their prompts through one batched prefill into the free cache rows, and their
first tokens are sampled. Then one decode step advances every live slot; a sequence that produced
a stop token or reached its `max_new_tokens` is finished and its slot freed at once, so a short
request never waits for a long one. Each request has its own options (greedy or seeded sampling,
token budget, stop ids) and its own random stream, so its tokens do not depend on its batch mates.
A request may carry a token constraint (`Request.constraint`, engine/constraints.py): its row's
logits are masked before selection, its batch mates' are not.

Consumers: `Engine.generate` (a whole batch, then wait), `PaliGemma.submit` / `predict_batch` /
`stream`, the HTTP server and eval/Ray through them. `on_token(token_id, logprob)` is called on
the scheduler thread for each generated token (streaming). Stepwise jobs (beam search,
`submit_job`) share the same bound and queue order: at most `max_jobs` run at once, each taking one
bounded step (a prefill, then one decode step of its own rows) after every decode step of the slots,
so they never hold the engine for a whole generation; a cancelled (or timed-out) job stops at its
next step. Anything else that must use the model runs through `call(fn)`, between steps, on the same
thread: the model is never entered by two threads.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import dataclasses
import logging
import math
import random
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .features import FeatureCache, encode_requests
from .request import Generation
from .constraints import check_constraint, masks_for
from .sampling import greedy_tokens, row_sampling, sample_rows
from .slots import SlotBatch

log = logging.getLogger("palikit.engine")
_RUNNING: weakref.WeakSet = weakref.WeakSet()  # schedulers with a live thread: stopped at exit


@atexit.register
def _close_all() -> None:
    for s in list(_RUNNING):
        s.close()


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"the generation queue is full; retry after {retry_after_s}s")
        self.retry_after_s = retry_after_s


class Closed(Exception):
    """The scheduler was shut down."""


@dataclass(eq=False)
class Ticket:
    """One submitted request: its future (-> Generation), timestamps (perf_counter) and tokens so far."""

    request: object
    options: object
    on_token: Callable[[int, float], None] | None
    stop_ids: frozenset
    seed: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    t_submit: float = field(default_factory=time.perf_counter)
    t_admitted: float | None = None
    t_encoded: float | None = None  # its batch's images through the vision tower (or the feature cache)
    t_first_token: float | None = None
    t_done: float | None = None
    tokens: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    steps: int = 0
    stopped: bool = False  # ended by a stop token (not by its token budget)
    cancelled: bool = False
    adapter: object = None  # its LoRA adapter (`engine.adapters.Adapter`), None = the base model
    lora_admitted: bool = False  # it holds a device slot of its adapter

    def cancel(self) -> None:
        """Stop it: dropped from the queue, or its slot freed at the next step."""
        self.cancelled = True

    def result(self, timeout: float | None = None):
        return self.future.result(timeout)


class Scheduler:
    def __init__(self, engine, *, max_slots: int = 16, max_len: int = 512, max_queue: int = 1024,
                 max_prefill_tokens: int = 8192, image_cache_bytes: int = 256 * 2**20, compile: bool = False,
                 min_admit: int | None = None, max_waiting_steps: int = 2, max_jobs: int = 2):
        if max_slots < 1 or max_queue < 1:
            raise ValueError("max_slots and max_queue must be >= 1")
        self.engine = engine
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_prefill_tokens = max_prefill_tokens
        self.min_admit = min_admit or max(1, max_slots // 4)
        self.max_waiting_steps = max_waiting_steps
        self._steps_waiting = 0  # decode steps run while requests waited for admission
        self.image_cache = FeatureCache(image_cache_bytes)
        self._batch_args = (max_slots, max_len, compile)
        self.batch: SlotBatch | None = None  # allocated on the scheduler thread
        self._queue: collections.deque[Ticket] = collections.deque()
        self._calls: collections.deque = collections.deque()
        self._live: dict[int, Ticket] = {}
        self.max_jobs = max_jobs  # stepwise jobs (beam search) running at once; the rest wait in `_jobs`
        self._jobs: collections.deque[Ticket] = collections.deque()
        self._running_jobs: list[Ticket] = []
        self._admitting = 0  # tickets taken from the queue and not yet in a slot (prefill running)
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._step_s = 0.05  # moving average of one decode step's time, for Retry-After
        self.tokens_generated = 0
        self.requests_done = 0
        self.decode_steps = 0
        self.decode_slot_steps = 0  # live slots summed over decode steps (mean occupancy = this / steps)
        self.on_step: Callable[[int], None] | None = None  # called on the engine thread after each step

    # ------------------------------------------------------------------------------ public
    def submit(self, request, options, on_token=None) -> Ticket:
        """Queue one request (thread-safe, returns at once). Admission (the one bound: the server adds
        none): refused with QueueFull and a Retry-After estimate when `max_queue` requests already
        wait beyond the `max_slots` that decode, i.e. when the engine holds `max_slots + max_queue`;
        Closed after `close()`."""
        stop = frozenset(() if options.ignore_eos else (*self.engine.eos_ids, *options.stop_ids))
        if request.constraint is not None:
            check_constraint(request.constraint)
        seed = options.sampling.seed if options.sampling.seed is not None else random.getrandbits(63)
        try:  # a row the batch tensors cannot hold is refused here, alone, never inside a batch
            row_sampling([options.sampling], [seed], self.engine.model.config.output_vocab_size, "cpu")
        except (RuntimeError, OverflowError, TypeError, ValueError) as e:
            raise ValueError(f"invalid sampling options: {e}") from None
        return self._enqueue(self._queue, Ticket(request, options, on_token, stop, seed))

    def submit_job(self, job, options) -> Ticket:
        """Queue a stepwise job (`job.step()` -> done?, then `job.result`; beam search) under the
        same bound as `submit`; its Ticket's future gets `job.result`, cancelling it stops the job."""
        return self._enqueue(self._jobs, Ticket(job, options, None, frozenset(), 0))

    def _enqueue(self, queue: collections.deque, ticket: Ticket) -> Ticket:
        """The one admission point: Closed after close(), QueueFull at the bound, else queued."""
        with self._cv:
            if self._closed:
                raise Closed("the engine is shut down")
            if self._held() >= self.max_slots + self.max_queue:
                raise QueueFull(self.retry_after())
            if getattr(ticket.options, "adapter", None) is not None:  # held until it ends: an unload waits for it
                ticket.adapter = self.engine.hold_adapter(ticket.options.adapter)
                ticket.request = dataclasses.replace(ticket.request)  # its own copy: features differ per adapter
            queue.append(ticket)
            self._ensure_thread()
            self._cv.notify()
        return ticket

    def _held(self) -> int:
        return (len(self._queue) + len(self._live) + self._admitting + len(self._jobs)
                + len(self._running_jobs))

    def call(self, fn: Callable[[], object], bounded: bool = False) -> concurrent.futures.Future:
        """Run `fn()` on the scheduler thread between two steps (beam search, warm-up, closed-set
        scoring). `bounded`: counted against the admission bound like a request (QueueFull)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise Closed("the engine is shut down")
            if bounded and self._held() + len(self._calls) >= self.max_slots + self.max_queue:
                raise QueueFull(self.retry_after())
            self._calls.append((fn, fut))
            self._ensure_thread()
            self._cv.notify()
        return fut

    def retry_after(self) -> int:
        """Seconds until a refused request would likely find room, from the work ahead of it: the
        decode steps left to the live requests and the token budgets of the queued ones, shared by the
        slots, times the recent time of one decode step (an upper bound: EOS ends requests earlier).
        Not a mean over past requests: long ones long gone do not inflate it."""
        live = sum(max(t.options.max_new_tokens - t.steps, 0) for t in list(self._live.values()))
        queued = sum(t.options.max_new_tokens for t in list(self._queue) + list(self._jobs))
        return max(1, math.ceil((live + queued) / self.max_slots * self._step_s))

    def stats(self) -> dict:
        c = self.image_cache
        lookups = c.hits + c.misses
        return {"live_slots": len(self._live), "max_slots": self.max_slots,
                "queued": len(self._queue) + len(self._jobs), "running_jobs": len(self._running_jobs),
                "tokens_generated": self.tokens_generated, "requests_done": self.requests_done,
                "decode_steps": self.decode_steps, "decode_slot_steps": self.decode_slot_steps,
                "image_cache_hits": c.hits, "image_cache_misses": c.misses,
                "image_cache_hit_rate": c.hits / lookups if lookups else 0.0, "image_cache_bytes": c.bytes}

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    # ------------------------------------------------------------------------------ loop
    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="palikit-engine", daemon=True)
            self._thread.start()
            _RUNNING.add(self)

    def _run(self) -> None:
        with torch.inference_mode():
            if self.batch is None:
                self.batch = SlotBatch(self.engine.model, *self._batch_args)
            while True:
                with self._cv:
                    while not (self._queue or self._calls or self._live or self._jobs or self._running_jobs
                               or self._closed):
                        self._cv.wait()
                    if self._closed:
                        self._fail_all(Closed("the engine is shut down"))
                        return
                    calls = list(self._calls)
                    self._calls.clear()
                    admit = self._take()
                for fn, fut in calls:
                    _run_call(fn, fut)
                if admit:
                    self._admit(admit)
                    self._admitting = 0
                if self._live:
                    try:
                        self._decode()
                    except Exception as e:  # noqa: BLE001 - e.g. out of memory: fail the live requests, keep serving
                        log.exception("decode step failed; failing the %d live requests", len(self._live))
                        self.batch.release(list(self._live))
                        for t in self._live.values():
                            self._finish(t, error=e)
                        self._live.clear()
                if self._jobs or self._running_jobs:
                    self._step_jobs()

    def _step_jobs(self) -> None:
        """One step of each running job (starting queued ones up to `max_jobs`); finished, failed or
        cancelled jobs settle their tickets."""
        with self._cv:
            while self._jobs and len(self._running_jobs) < self.max_jobs:
                t = self._jobs.popleft()
                if t.cancelled:
                    t.future.cancel()
                else:
                    t.t_admitted = time.perf_counter()
                    self._running_jobs.append(t)
        for t in list(self._running_jobs):
            error, done = None, t.cancelled or t.future.done()
            if not done:
                try:
                    done = t.request.step()
                except Exception as e:  # noqa: BLE001 - one failed job ends only itself
                    error, done = e, True
            if done:
                self._running_jobs.remove(t)
                self._finish(t, error=error, result=None if error or t.cancelled else t.request.result)

    def _admit_now(self, free: int) -> bool:
        queued = len(self._queue)
        if not queued or not free:
            return False
        return (len(self._live) < self.max_slots // 2 or min(queued, free) >= self.min_admit
                or self._steps_waiting >= self.max_waiting_steps)

    def _take(self) -> list[Ticket]:
        """Queued tickets for the free slots, oldest first, within the prefill token budget (when
        admitting now is worth a prefill; else none)."""
        free = self.max_slots - len(self._live)
        if not self._admit_now(free):
            self._steps_waiting += bool(self._queue)
            return []
        self._steps_waiting = 0
        out, tokens, waiting = [], 0, []
        while self._queue and len(out) < free:
            t = self._queue[0]
            if t.cancelled:
                self._queue.popleft()
                self._release_adapter(t)
                t.future.cancel()
                continue
            n = self._prompt_len(t.request)
            if out and tokens + n > self.max_prefill_tokens:
                break
            t = self._queue.popleft()
            if self._lora_slot(t):
                out.append(t)
                tokens += n
            elif not t.future.done():  # its adapter waits for a free device slot
                waiting.append(t)
        self._queue.extendleft(reversed(waiting))
        self._admitting = len(out)  # (under the lock: the admission bound still counts them)
        return out

    def _lora_slot(self, t: Ticket) -> bool:
        """Give an admitted ticket its adapter's device slot; False: none free now (or it failed)."""
        if t.adapter is None:
            return True
        try:
            slot = self.engine.adapters.acquire(t.adapter)
        except Exception as e:  # noqa: BLE001 - e.g. its file changed on disk since it was loaded
            self._finish(t, error=e)
            return False
        if slot is None:
            return False
        t.lora_admitted = True
        t.request.lora_slot, t.request.lora_key = slot, (t.adapter.uid if t.adapter.tower else None)
        return True

    def _release_adapter(self, t: Ticket) -> None:
        if t.adapter is not None:
            self.engine.adapters.release(t.adapter, t.lora_admitted)
            t.adapter = None

    def _prompt_len(self, request) -> int:
        n_img = 0
        if request.image_features is not None:
            n_img = request.image_features.shape[0]
        elif request.pixel_values is not None:
            n_img = request.pixel_values.shape[0] * self.engine.model.config.vision.num_image_tokens
        return n_img + len(request.text_ids)

    def _admit(self, tickets: list[Ticket]) -> None:
        try:
            self._prefill(tickets)
        except Exception as e:  # noqa: BLE001 - one bad request must not fail its batch mates
            if len(tickets) == 1:
                self._finish(tickets[0], error=e)
                return
            log.info("prefill of %d requests failed (%s); admitting them one by one", len(tickets), type(e).__name__)
            for t in tickets:
                self._admit([t])

    def _prefill(self, tickets: list[Ticket]) -> None:
        batch = self.batch
        now = time.perf_counter()
        for t in tickets:
            t.t_admitted = now
        encode_requests(self.engine.model, [t.request for t in tickets], self.image_cache)
        encoded = time.perf_counter()
        for t in tickets:
            t.t_encoded = encoded
        rows = [r for r in range(self.max_slots) if r not in self._live][: len(tickets)]
        try:
            logits = batch.prefill(rows, [t.request for t in tickets])
            sampling = row_sampling([t.options.sampling for t in tickets], [t.seed for t in tickets],
                                    batch.vocab, batch.device)
            allowed = masks_for([t.request.constraint for t in tickets], [t.stop_ids for t in tickets], batch.vocab,
                                batch.device)
            if all(t.options.sampling.greedy for t in tickets):
                tokens, logprobs = greedy_tokens(logits, allowed)
            else:
                tokens, logprobs = sample_rows(logits, sampling, allowed)
            sampling.counter += 1
            batch.set_tokens(rows, tokens)
            batch.set_sampling(rows, sampling)
        except Exception:
            batch.release(rows)
            raise
        for row, t in zip(rows, tickets):
            self._live[row] = t
        self._deliver(dict(zip(rows, zip(tokens.tolist(), logprobs.tolist()))))

    def _decode(self) -> None:
        sample = any(not t.options.sampling.greedy for t in self._live.values())
        t0 = time.perf_counter()
        masked = any(t.request.constraint is not None for t in self._live.values())
        tokens, logprobs = self.batch.step(sample, masked)
        self.decode_steps += 1
        self.decode_slot_steps += len(self._live)
        if self.on_step is not None:
            self.on_step(self.decode_steps)
        toks, lps = tokens.tolist(), logprobs.tolist()  # one host sync per step
        self._step_s = 0.8 * self._step_s + 0.2 * (time.perf_counter() - t0)
        self._deliver({row: (toks[row], lps[row]) for row in self._live})

    def _deliver(self, outputs: dict[int, tuple[int, float]]) -> None:
        now = time.perf_counter()
        done = []
        for row, (tok, lp) in outputs.items():
            t = self._live[row]
            if t.cancelled or t.future.done():  # cancelled by its consumer (or its future was)
                done.append(row)
                continue
            t.steps += 1
            self.tokens_generated += 1
            if t.t_first_token is None:
                t.t_first_token = now
            stop = tok in t.stop_ids
            if not stop:
                t.tokens.append(tok)
                t.logprobs.append(lp)
                if t.on_token is not None:
                    try:
                        t.on_token(tok, lp)
                    except Exception as e:  # noqa: BLE001 - a broken consumer ends its own request only
                        t.cancelled = True
                        settle_future(t.future, error=e)
            last = stop or t.steps >= t.options.max_new_tokens
            if t.request.constraint is not None and not stop and not t.cancelled and not self._constrain(row, t, tok, last):
                last = True
            if last:
                t.stopped = stop
                done.append(row)
        if done:
            self.batch.release(done)
            for row in done:
                self._finish(self._live.pop(row))

    def _constrain(self, row: int, t: Ticket, tok: int, last: bool) -> bool:
        """Advance the row's constraint past `tok` and (unless it was the row's `last`) set its mask
        for the next step; False (the request failed with the constraint's error) when it raised."""
        try:
            t.request.constraint.advance(tok)
            if not last:
                self.batch.set_allowed(row, t.request.constraint, t.stop_ids)
        except Exception as e:  # noqa: BLE001 - a broken constraint ends its own request only
            t.cancelled = True
            settle_future(t.future, error=e)
            return False
        return True

    def _finish(self, t: Ticket, error: BaseException | None = None, result=None) -> None:
        t.t_done = time.perf_counter()
        self._release_adapter(t)
        self.requests_done += 1
        if error is not None:
            settle_future(t.future, error=error)
        elif t.cancelled:
            t.future.cancel()
        elif result is not None:
            settle_future(t.future, result)
        else:
            settle_future(t.future, Generation(t.tokens, t.logprobs, t.stopped, _timings(t)))

    def _fail_all(self, error: BaseException) -> None:
        for t in list(self._queue) + list(self._live.values()) + list(self._jobs) + self._running_jobs:
            self._release_adapter(t)
            settle_future(t.future, error=error)
        self._queue.clear()
        self._live.clear()
        self._jobs.clear()
        self._running_jobs.clear()
        for _, fut in self._calls:
            settle_future(fut, error=error)
        self._calls.clear()


def settle_future(fut: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Complete a future unless its consumer already cancelled it (from another thread)."""
    try:
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _run_call(fn, fut: concurrent.futures.Future) -> None:
    if not fut.set_running_or_notify_cancel():  # cancelled while it waited (e.g. its HTTP request timed out)
        return
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001
        settle_future(fut, error=e)
    else:
        settle_future(fut, result)


def _timings(t: Ticket) -> dict[str, float]:
    """Per-request figures a client may see. prefill_ms starts after the vision tower: the image-feature
    cache is shared by every client, so a figure that includes the tower would tell whether someone
    else sent the same image recently."""
    first = t.t_first_token or t.t_done
    n_decode = max(t.steps - 1, 1)
    return {"queue_ms": ((t.t_admitted or t.t_submit) - t.t_submit) * 1e3,
            "prefill_ms": (first - (t.t_encoded or t.t_admitted or t.t_submit)) * 1e3,
            "decode_ms": (t.t_done - first) * 1e3,
            "decode_step_ms": (t.t_done - first) * 1e3 / n_decode}
