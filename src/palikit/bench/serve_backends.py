"""The three serving backends the serving benchmark (`bench/serve.py`) replays one trace against, behind
one small interface: `submit(request) -> Handle` returns at once; a Handle carries perf_counter stamps
(t_submit, t_first_token, t_done), the generated token ids and text, or the error.

  ContinuousBackend   (a) the continuous slot scheduler: `pg.submit(image, prompt, on_text=, **options)`,
                      stamps read from its pending object (`pg.configure_scheduler(max_slots=)` sets slots).
  RunToCompletion     (b) the serving path before the continuous scheduler: a FIFO gathered into batches
                      of identical options up to `slots` (5 ms gathering wait), each batch run until its
                      longest member ends, so the first token is known only when the batch is done
                      (t_first_token = t_done).
  HFSequential        (c) transformers `generate` (greedy, eager attention, same weights) one request at a
                      time in FIFO order; the first token is stamped by a generate streamer.
"""

from __future__ import annotations

import collections
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(eq=False)
class Handle:
    """One submitted request, as a backend reports it."""

    index: int
    t_submit: float
    t_first_token: float | None = None
    t_done: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: str | None = None
    error: str | None = None
    _event: threading.Event = field(default_factory=threading.Event, repr=False)

    def finish(self, result=None, error: BaseException | None = None) -> None:
        now = time.perf_counter()
        if error is not None:
            self.error = f"{type(error).__name__}: {error}"
        else:
            self.tokens, self.text = list(result.tokens), result.text
        self.t_done = now
        if self.t_first_token is None:
            self.t_first_token = now
        self._event.set()

    def wait(self, timeout: float | None) -> bool:
        return self._event.wait(timeout)


# ------------------------------------------------------------------------------------------- (a)
class ContinuousBackend:
    """(a) Adapter over the continuous scheduler's public interface (see the module docstring)."""

    name = "continuous"
    label = "(a) continuous scheduler"
    impl = "PaliGemma.submit"

    def __init__(self, pg, slots: int):
        if not self.available(pg):
            raise ValueError("this PaliGemma has no continuous scheduler (submit / configure_scheduler): "
                             "run the benchmark with a build that has it, or without backend (a)")
        self.pg = pg
        pg.configure_scheduler(max_slots=slots)

    @staticmethod
    def available(pg) -> bool:
        return callable(getattr(pg, "submit", None)) and callable(getattr(pg, "configure_scheduler", None))

    def submit(self, index: int, image, prompt: str, options: dict, on_text=None) -> Handle:
        h = _PendingHandle(index, time.perf_counter(), tokenizer=self.pg.tokenizer)
        try:
            h.pending = self.pg.submit(image, prompt, on_text=on_text, **{"constrained": False, **options})  # as (b), (c)
        except Exception as e:  # noqa: BLE001 - a refused request is counted as failed
            h.finish(error=e)
        return h

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _PendingHandle(Handle):
    """A Handle over the scheduler's pending object, whose own stamps are the measurement."""

    pending: Any = None
    tokenizer: Any = None

    def wait(self, timeout: float | None) -> bool:
        if self.pending is None or self._event.is_set():
            return self._event.is_set()
        fut = getattr(self.pending, "future", None)
        try:
            if fut is not None:  # the engine's Generation: tokens and text, no task parsing (as (b), (c))
                gen = fut.result(timeout)
                result = _Tokens(list(gen.tokens), self.tokenizer.decode(gen.tokens))
            else:
                result = self.pending.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            return False
        except Exception as e:  # noqa: BLE001
            self.finish(error=e)
        else:
            self.finish(result)
        p = self.pending
        self.t_submit = p.t_submit
        self.t_done = p.t_done if p.t_done is not None else self.t_done
        self.t_first_token = p.t_first_token if p.t_first_token is not None else self.t_done
        return True


# ------------------------------------------------------------------------------------------- (b)
@dataclass(eq=False)
class _Job:
    handle: Handle
    key: tuple
    image: Any
    prompt: str
    options: dict


class RunToCompletion:
    """(b) Run-to-completion batching: a FIFO and one worker thread that takes the oldest request plus
    every queued one with identical options (up to `slots`), waits at most `max_wait_ms` from the
    oldest's arrival for the batch to fill, and runs the batch until its longest member ends, as the
    server's micro-batcher did before the continuous scheduler (nothing is refused: the queue is not
    capped, so waiting shows up as latency). Batches run through `_SlotBatchRunner` on a `SlotBatch` of
    the engine: the same kernels as (a), only the policy differs."""

    name = "run_to_completion"
    label = "(b) run-to-completion batches"

    def __init__(self, pg, slots: int, max_wait_ms: float = 5.0):
        self.pg, self.slots, self.max_wait_s = pg, slots, max_wait_ms / 1e3
        self.run_batch, self.impl = _SlotBatchRunner(pg), "SlotBatch prefilled per batch, decoded to its end"
        self.batches: list[int] = []
        self._queue: collections.deque[_Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopped = False
        self.thread = threading.Thread(target=self._worker, name="serve-bench-batcher", daemon=True)
        self.thread.start()

    def submit(self, index: int, image, prompt: str, options: dict, on_text=None) -> Handle:
        h = Handle(index, time.perf_counter())
        with self._cv:
            self._queue.append(_Job(h, tuple(sorted(options.items())), image, prompt, options))
            self._cv.notify()
        return h

    def _ready(self) -> int:
        head = self._queue[0]
        return min(sum(j.key == head.key for j in self._queue), self.slots)

    def _take(self) -> list[_Job]:
        head = self._queue.popleft()
        batch, keep = [head], collections.deque()
        for job in self._queue:
            (batch if len(batch) < self.slots and job.key == head.key else keep).append(job)
        self._queue = keep
        return batch

    def _worker(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopped:
                    self._cv.wait()
                while not self._stopped and self._ready() < self.slots:  # bounded wait for the batch to fill
                    left = self._queue[0].handle.t_submit + self.max_wait_s - time.perf_counter()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                if self._stopped:
                    return
                batch = self._take()
            try:
                results = self.run_batch([j.image for j in batch], [j.prompt for j in batch], batch[0].options)
            except Exception as e:  # noqa: BLE001 - every member of a failed batch counts as failed
                for j in batch:
                    j.handle.finish(error=e)
            else:
                for j, r in zip(batch, results):
                    j.handle.finish(r)
            self.batches.append(len(batch))

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self.thread.join(60)


class _SlotBatchRunner:
    """One run-to-completion batch: each distinct image through the tower once, then the engine's
    public pieces: one `engine.new_batch` per batch size, the whole batch prefilled at once, then greedy
    steps for every row until the last row ends (ended rows keep decoding, as the pre-continuous engine
    did), on the engine thread (`engine.scheduler.call`). Tokens and text only: no task parsing, as (a)
    and (c)."""

    def __init__(self, pg):
        self.pg, self.engine = pg, pg.engine
        self._batches: dict[int, Any] = {}

    def __call__(self, images, prompts, options) -> list[Any]:
        from ..engine import Request

        extra = set(options) - {"max_new_tokens"}
        if extra:
            raise ValueError(f"the run-to-completion backend replays greedy requests only; drop {sorted(extra)}")
        max_new = options.get("max_new_tokens", 64)
        feats: dict[int, torch.Tensor] = {}
        model = self.pg.model
        w = model.vision_tower.embeddings.patch_embedding.weight
        with torch.inference_mode():
            for img in images:  # each distinct image through the tower once
                if id(img) not in feats:
                    pv = self.pg.processor.preprocess_with_sizes([img])[0].to(w.device, w.dtype)  # [1, 3, S, S]
                    feats[id(img)] = model.embed_images(pv)[0]  # [N, H]
        requests = [Request(self.pg.tokenizer.encode_prompt(p).ids, image_features=feats[id(i)])
                    for i, p in zip(images, prompts)]
        rows = self.engine.scheduler.call(lambda: self._run(requests, max_new)).result()
        return [_Tokens(t, self.pg.tokenizer.decode(t)) for t in rows]

    @torch.inference_mode()
    def _run(self, requests, max_new: int) -> list[list[int]]:
        B = len(requests)
        P = max(len(r.text_ids) + r.image_features.shape[0] for r in requests)
        if B not in self._batches:
            self._batches[B] = self.engine.new_batch(B, P + max_new)
        batch, rows = self._batches[B], list(range(B))
        tokens = batch.prefill(rows, requests).argmax(dim=-1)  # [B]
        batch.set_tokens(rows, tokens)
        out: list[list[int]] = [[] for _ in rows]
        ended = [False] * B
        eos = set(self.engine.eos_ids)
        for step in range(max_new):
            for b, t in enumerate(tokens.tolist()):
                ended[b] = ended[b] or t in eos
                if not ended[b]:
                    out[b].append(t)
            if all(ended) or step + 1 == max_new:
                break
            tokens, _ = batch.step(sample=False)
        batch.release(rows)
        return out


# ------------------------------------------------------------------------------------------- (c)
class _FirstTokenStamp:
    """A transformers generate streamer that only stamps when the first new token arrives."""

    def __init__(self, h: Handle):
        self.h, self.calls = h, 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call carries the prompt
            self.h.t_first_token = time.perf_counter()

    def end(self) -> None:
        pass


class HFSequential:
    """(c) transformers `generate` on the same weights, one request at a time, FIFO."""

    name = "transformers"
    label = "(c) transformers generate, one at a time"
    impl = "PaliGemmaForConditionalGeneration.generate, greedy, eager attention"

    def __init__(self, pg):
        from ..testing import hf_model_from

        self.pg = pg
        self.hf = hf_model_from(pg.model)
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._worker, name="serve-bench-hf", daemon=True)
        self.thread.start()

    def submit(self, index: int, image, prompt: str, options: dict, on_text=None) -> Handle:
        extra = set(options) - {"max_new_tokens"}
        if extra:
            raise ValueError(f"the transformers backend replays greedy requests only; drop {sorted(extra)}")
        h = Handle(index, time.perf_counter())
        self.queue.put((h, image, prompt, options))
        return h

    def generate(self, image, prompt: str, max_new_tokens: int = 64, streamer=None) -> list[int]:
        """Greedy tokens (EOS cut) for one request, inputs built by palikit's processor/tokenizer."""
        pg, cfg = self.pg, self.pg.model.config
        w = pg.model.language_model.embed_tokens.weight
        pixels = pg.processor.preprocess_with_sizes([image])[0].to(w.device, w.dtype)  # [1, 3, S, S]
        ids = torch.tensor([cfg.prompt_row(pg.tokenizer.encode_prompt(prompt).ids)], device=w.device)  # [1, N + T]
        with torch.inference_mode():
            out = self.hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                   token_type_ids=torch.zeros_like(ids), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=pg.tokenizer.eos_id,
                                   pad_token_id=pg.tokenizer.pad_id, streamer=streamer)
        new = out[0, ids.shape[1]:].tolist()
        eos = pg.tokenizer.eos_id
        return new[:new.index(eos)] if eos in new else new

    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            h, image, prompt, options = item
            try:
                tokens = self.generate(image, prompt, streamer=_FirstTokenStamp(h), **options)
                h.finish(_Tokens(tokens, self.pg.tokenizer.decode(tokens)))
            except Exception as e:  # noqa: BLE001
                h.finish(error=e)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(60)


@dataclass
class _Tokens:
    tokens: list[int]
    text: str


BACKENDS = {"a": ContinuousBackend, "b": RunToCompletion, "c": HFSequential}
