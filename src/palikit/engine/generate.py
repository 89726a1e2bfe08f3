"""The generation engine's public face: `Request`, `GenerationOptions`, `Generation` and `Engine`.

`Engine` runs everything on one continuous-batching scheduler (`scheduler.py`) over a slot cache
(`slots.py`): `submit` queues one request with its own options and returns a `Ticket` at once;
`generate` submits a list and waits. Beam search keeps its own path (`beam.py`) on a `SlotBatch` of
its own: a stepwise job the scheduler interleaves with its decode steps (`Scheduler.submit_job`). The engine sees token ids and image
pixels/features only; text and image files are the task API's job.
"""

from __future__ import annotations

import torch

from ..model import PaliGemmaModel
from ..model.lora import touches_tower
from .request import Generation, GenerationOptions, Request
from .scheduler import Scheduler, Ticket
from .slots import SlotBatch

__all__ = ["Engine", "Generation", "GenerationOptions", "Request", "generate_naive"]


class Engine:
    """Continuous-batching generation over a PaliGemmaModel: `max_slots` sequences decode together;
    new requests join between steps; the cache (`max_len` slots per row, grown on demand) and the
    compiled step are reused across calls."""

    def __init__(self, model: PaliGemmaModel, eos_ids: tuple[int, ...] | None = None, compile: bool = False,
                 max_slots: int = 16, max_len: int = 512, max_queue: int = 1024,
                 image_cache_bytes: int = 256 * 2**20, max_loras: int = 0, max_lora_rank: int = 16,
                 max_cpu_loras: int | None = None, adapter_reader=None):
        self.model = model
        self.adapters = None  # `engine.adapters.AdapterSlots` once multi-LoRA is on (max_loras > 0)
        self.adapter_reader = adapter_reader  # path -> (config, layers): `weights.adapter.read_adapter`
        if max_loras:
            self.enable_adapters(max_loras, max_lora_rank, max_cpu_loras, max_rows=max_slots)
        cfg = model.config
        self.eos_ids = tuple(eos_ids) if eos_ids else (cfg.eos_token_id,)
        self.pad_id = cfg.pad_token_id
        self.compile = compile
        self.scheduler = Scheduler(self, max_slots=max_slots, max_len=max_len, max_queue=max_queue,
                                   image_cache_bytes=image_cache_bytes, compile=compile)

    def configure(self, **settings) -> None:
        """A new scheduler with other settings (max_slots, max_len, max_queue, max_prefill_tokens,
        image_cache_bytes); the old one is shut down first, so call it while nothing runs."""
        self.scheduler.close()
        self.scheduler = Scheduler(self, compile=self.compile, **settings)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    # ------------------------------------------------------------------------------ adapters
    def enable_adapters(self, max_loras: int = 4, max_lora_rank: int = 16, max_cpu_loras: int | None = None,
                        targets=None, max_rows: int = 64) -> None:
        """Serve LoRA adapters unmerged, `max_loras` of them on the device at once (ranks up to
        `max_lora_rank`; `max_cpu_loras` kept on the CPU). Installs the model's LoRA slots: call it
        before the first request (afterwards loads and unloads never recompile)."""
        from .adapters import AdapterSlots

        if self.adapters is not None:
            raise ValueError("adapters are already enabled on this engine")
        if self.adapter_reader is None:
            raise ValueError("this engine has no adapter reader (Engine(adapter_reader=weights.adapter.read_adapter))")
        self.adapters = AdapterSlots(self.model, self.adapter_reader, max_loras, max_lora_rank, max_cpu_loras, targets,
                                     max_rows=max(64, max_rows))

    def load_adapter(self, name: str, path) -> None:
        """Load a PEFT LoRA adapter under `name` (adapters enabled with defaults on first use)."""
        if self.adapters is None:
            self.enable_adapters(max_rows=self.scheduler.max_slots)
        self.adapters.load(name, path)

    def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name` now; the ones already submitted finish on it first."""
        from .adapters import UnknownAdapter

        if self.adapters is None:
            raise UnknownAdapter(name, [])
        self.adapters.unload(name)

    def adapter_names(self) -> list[str]:
        return [] if self.adapters is None else self.adapters.names()

    def hold_adapter(self, name: str):
        """The adapter a submitted request runs on (the scheduler releases it when the request ends)."""
        from .adapters import UnknownAdapter

        if self.adapters is None:
            raise UnknownAdapter(name, [])
        return self.adapters.hold(name)

    def check(self, request: Request, options: GenerationOptions | None = None) -> None:
        """Refuse a request the model cannot run, with the reason (before it reaches a batch)."""
        if options is not None and options.num_beams > 1:  # beam search: base model, free text only
            if request.constraint is not None:
                raise ValueError("constrained output decodes with num_beams=1; drop num_beams or the constraint "
                                 "(constrained=False for detect/segment)")
            if options.adapter is not None:
                raise ValueError("beam search (num_beams > 1) runs on the base model only; drop num_beams or the "
                                 "adapter")
        if options is not None and options.adapter is not None and request.image_features is not None:
            self._check_features_adapter(options.adapter)
        vocab = self.model.config.text.vocab_size
        if not request.text_ids:
            raise ValueError("a request needs at least one text token ([BOS] ...)")
        bad = [t for t in request.text_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")

    def _check_features_adapter(self, name: str) -> None:
        """Precomputed image features skip the vision tower: refused for an adapter that changes it."""
        adapter = self.adapters.get(name) if self.adapters is not None else None  # unknown: the hold says so
        if adapter is not None and adapter.tower:
            tower = [m for m in adapter.modules if touches_tower([m])]
            raise ValueError(f"adapter {name!r} changes the vision tower / projector ({tower[0]}"
                             f"{f' and {len(tower) - 1} more' if len(tower) > 1 else ''}), so image features "
                             "computed without it would give a wrong answer: pass the image's pixels "
                             "(pixel_values) instead of image_features for this adapter")

    def submit(self, request: Request, options: GenerationOptions = GenerationOptions(), on_token=None) -> Ticket:
        """Queue one request; the Ticket's `result()` is its Generation. `on_token(id, logprob)` is
        called on the engine thread for each generated token (EOS excluded)."""
        self.check(request, options)
        if options.num_beams > 1:  # beam search: its own batch, stepped between the engine's decode steps
            from .beam import BeamSearch

            return self.scheduler.submit_job(BeamSearch(self, [request], options, single=True), options)
        return self.scheduler.submit(request, options, on_token)

    def generate(self, requests: list[Request], options: GenerationOptions = GenerationOptions()) -> list[Generation]:
        if not requests:
            return []
        for r in requests:
            self.check(r, options)
        if options.num_beams > 1:
            from .beam import BeamSearch

            return self.scheduler.submit_job(BeamSearch(self, requests, options), options).result()
        tickets = [self.scheduler.submit(r, options, None) for r in requests]
        return [t.result() for t in tickets]

    def score(self, request: Request, continuations: list[list[int]]):
        """Queue closed-set scoring (`score.py`: one prefill of the prompt, the continuations as
        parallel teacher-forced rows) on the engine thread, within the admission bound. The future's
        result: per continuation, the log-prob of each of its tokens."""
        from .features import encode_requests
        from .score import score_continuations

        self.check(request)
        vocab = self.model.config.output_vocab_size
        bad = [t for c in continuations for t in c if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"continuation token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")

        def run():
            encode_requests(self.model, [request], self.scheduler.image_cache)
            return score_continuations(self.model, request, continuations)

        return self.scheduler.call(run, bounded=True)

    def new_batch(self, n_rows: int, max_len: int) -> SlotBatch:
        """A SlotBatch of its own (beam search); use it on the engine thread only."""
        return SlotBatch(self.model, n_rows, max_len)

    def close(self) -> None:
        self.scheduler.close()


@torch.inference_mode()
def generate_naive(model: PaliGemmaModel, request: Request, max_new_tokens: int, eos_ids=(1,)) -> list[int]:
    """Reference greedy decoding: recompute the whole sequence every step, no cache."""
    n_img = 0 if request.image_features is None else request.image_features.shape[0]
    ids = model.config.prompt_row(request.text_ids, n_img)
    ar = [0] * len(ids)
    feats = None if request.image_features is None else request.image_features[None]
    out: list[int] = []
    for _ in range(max_new_tokens):
        t = torch.tensor([ids])
        logits = model(t, image_features=feats, ar_mask=torch.tensor([ar]))[0, -1]
        nxt = int(logits.argmax())
        if nxt in eos_ids:
            break
        out.append(nxt)
        ids.append(nxt)
        ar.append(1)
    return out
