"""The three serving backends the serving benchmark (`serve_bench`) replays one trace against, behind
one small interface: `submit(request) -> Handle` returns at once; a Handle carries perf_counter stamps
(t_submit, t_first_token, t_done), the generated token ids and text, or the error.

  ContinuousBackend   (a) the continuous slot scheduler: `pg.submit(image, prompt, on_text=, **options)`,
                      stamps read from its pending object (`pg.configure_scheduler(max_slots=)` sets slots).
  RunToCompletion     (b) today's serving path: the server's own MicroBatcher (bounded FIFO, batches of
                      identical options up to `slots`, 5 ms gathering wait) over `pg.predict_batch`; each
                      batch runs until its longest member ends, so the first token is known only when the
                      batch is done (t_first_token = t_done).
  HFSequential        (c) transformers `generate` (greedy, eager attention, same weights) one request at a
                      time in FIFO order; the first token is stamped by a generate streamer.

Also `random_paligemma`: a full-size `PaliGemma` with random weights of a preset's shape (GPU runs
without downloading anything), with a tokenizer that spans the preset's whole output vocabulary.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field, replace
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
        h = _PendingHandle(index, time.perf_counter())
        try:
            h.pending = self.pg.submit(image, prompt, on_text=on_text, **options)
        except Exception as e:  # noqa: BLE001 - a refused request is counted as failed
            h.finish(error=e)
        return h

    def close(self) -> None:
        pass


@dataclass(eq=False)
class _PendingHandle(Handle):
    """A Handle over the scheduler's pending object, whose own stamps are the measurement."""

    pending: Any = None

    def wait(self, timeout: float | None) -> bool:
        if self.pending is None or self._event.is_set():
            return self._event.is_set()
        try:
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
class RunToCompletion:
    """(b) The server's MicroBatcher over `pg.predict_batch`, on its own event loop thread."""

    name = "run_to_completion"
    label = "(b) run-to-completion batches"

    def __init__(self, pg, slots: int, max_wait_ms: float = 5.0, max_queue: int = 100_000):
        from ..serve.batcher import MicroBatcher

        self.pg = pg
        self.batches: list[int] = []
        self.batcher = MicroBatcher(self._run_batch, max_batch_size=slots, max_wait_ms=max_wait_ms,
                                    max_queue=max_queue, on_batch=lambda n, s: self.batches.append(n))
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="serve-bench-batcher", daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.batcher.start(), self.loop).result(30)

    def _run_batch(self, key: tuple, payloads: list[tuple]) -> list[Any]:
        return self.pg.predict_batch([p[0] for p in payloads], [p[1] for p in payloads],
                                     batch_size=len(payloads), **dict(key))

    async def _one(self, h: Handle, key: tuple, payload: tuple) -> None:
        try:
            result = await self.batcher.submit(key, payload)
        except Exception as e:  # noqa: BLE001 - QueueFull, Stopped or the model's error
            h.finish(error=e)
        else:
            h.finish(result)

    def submit(self, index: int, image, prompt: str, options: dict, on_text=None) -> Handle:
        h = Handle(index, time.perf_counter())
        key = tuple(sorted(options.items()))  # batches hold identical options, as in the server
        asyncio.run_coroutine_threadsafe(self._one(h, key, (image, prompt)), self.loop)
        return h

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.batcher.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


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

    def __init__(self, pg):
        from .bench import hf_model_from

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
        ids = torch.tensor([[cfg.image_token_index] * cfg.vision.num_image_tokens
                            + pg.tokenizer.encode_prompt(prompt).ids], device=w.device)  # [1, N + T]
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


# ------------------------------------------------------------------------------------- random weights
def random_tokenizer(cfg, folder):
    """A PaliGemma-style tokenizer whose ids span `cfg`'s output vocabulary (so every id a random model
    emits decodes), and the config it fits: a full-size preset keeps its vocabulary (filler words pad
    the tokenizer up to it; the embedding gets the checkpoints' 64-row padding past <image>), a tiny one
    takes the tokenizer's size, as `make_tiny_checkpoint` does."""
    from ..testing import CHARS, WORDS
    from ..tokenizer import build_tokenizer

    tok = build_tokenizer(WORDS + CHARS, folder / "tokenizer.json")
    want = cfg.output_vocab_size + 1  # the output ids, then <image> as the last id
    if want > tok.vocab_size:
        gap = want - tok.vocab_size
        filler = [f"zq{i}" for i in range(gap // 2)] + ([" zq"] if gap % 2 else [])  # 2 ids / 1 id each
        tok = build_tokenizer(WORDS + CHARS + filler, folder / "tokenizer.json")
        if tok.vocab_size != want or cfg.image_token_index != want - 1:
            raise ValueError(f"{cfg.name}: cannot build a tokenizer with <image> at id {cfg.image_token_index}")
        rows = max(cfg.text.vocab_size, (want + 63) // 64 * 64)
        return tok, replace(cfg, text=replace(cfg.text, vocab_size=rows))
    text = replace(cfg.text, vocab_size=tok.vocab_size)
    return tok, replace(cfg, text=text, image_token_index=tok.vocab_size - 1)


def random_paligemma(preset: str, device="cpu", dtype=torch.float32, seed: int = 0, folder=None):
    """A `PaliGemma` with random weights of `preset`'s shape (see `random_tokenizer`); the tokenizer is
    written to `folder` (a temp dir by default)."""
    import tempfile
    from pathlib import Path

    from ..api import PaliGemma
    from ..config import get_config
    from ..preprocess import ImageProcessor
    from .bench import random_model

    folder = Path(folder or tempfile.mkdtemp(prefix="palikit-serve-bench-"))
    tok, cfg = random_tokenizer(get_config(preset), folder)
    model = random_model(cfg, device, dtype, seed=seed)
    proc = ImageProcessor(size=cfg.vision.image_size, patch_size=cfg.vision.patch_size)
    return PaliGemma(model, tok, proc, name=f"{cfg.name}-random")
