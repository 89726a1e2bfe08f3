"""The user-facing `PaliGemma` object: images + prompts in, structured `Result`s out (text, boxes in
pixels of the original image, masks, confidence scores, timings). It ties together the checkpoint
loader, tokenizer, image processor, engine, output parser and mask codec; each stays ignorant of
the others.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .engine import Engine, GenerationOptions, Request, SamplingOptions
from .model import PaliGemmaModel
from .tasks.labels import requested_labels
from .tasks.options import PredictOptions

MAX_PROMPT_TOKENS = 1024


class PaliGemma:
    """A loaded PaliGemma (1 or 2) with its tokenizer, image processor and optional mask codec."""

    def __init__(self, model: PaliGemmaModel, tokenizer, processor, mask_codec=None, *, compile: bool = False,
                 name: str | None = None):
        cfg = model.config
        if tokenizer.vocab_size > cfg.text.vocab_size:
            raise ValueError(
                f"The tokenizer has {tokenizer.vocab_size} tokens but the model's embedding has only "
                f"{cfg.text.vocab_size} rows: tokenizer and weights do not belong together."
            )
        if (tokenizer.bos_id, tokenizer.eos_id) != (cfg.bos_token_id, cfg.eos_token_id):
            raise ValueError(
                f"Tokenizer BOS/EOS ids ({tokenizer.bos_id}, {tokenizer.eos_id}) differ from the model config's "
                f"({cfg.bos_token_id}, {cfg.eos_token_id}): tokenizer and weights do not belong together."
            )
        if tokenizer.loc_ids and max(tokenizer.loc_ids + tokenizer.seg_ids) >= cfg.output_vocab_size:
            raise ValueError("The tokenizer's <loc>/<seg> ids lie outside the model's vocabulary; wrong tokenizer.")
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor
        self.mask_codec = mask_codec
        self.name = name or cfg.name
        from .weights.adapter import read_adapter

        self.engine = Engine(model, eos_ids=(tokenizer.eos_id,), compile=compile, adapter_reader=read_adapter)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                        tokenizer: str | os.PathLike | None = None, mask_codec: str | os.PathLike | None = None,
                        revision: str | None = None, compile: bool = False,
                        final_logit_softcap: str | float | None = "auto",
                        sliding_window: str | int | None = "auto",
                        adapter: str | os.PathLike | None = None, quantize: str | None = None,
                        group_size: int | None = None, keep_vision: bool = False,
                        adapters: dict[str, str | os.PathLike] | None = None, max_loras: int = 0,
                        max_lora_rank: int = 16, max_cpu_loras: int | None = None) -> PaliGemma:
        """`model`: a Hub-layout folder, a big_vision `.npz` (tokenizer next to it or `tokenizer=`), or a
        Hub id such as `google/paligemma2-3b-mix-224` (cache and HF_HUB_OFFLINE honoured). `adapter`: a
        LoRA adapter folder in PEFT format (`palikit train`'s `output_dir/adapter`), merged into the weights.
        `final_logit_softcap` / `sliding_window`: "auto" (the checkpoint's convention, see README
        "Conventions"), a number, or None/"off". `quantize`: "int8" / "int4" quantizes the weights at
        load (`group_size`, `keep_vision` as `palikit quantize`); a folder written by `palikit quantize`
        loads quantized without it, and an adapter on it stays an unmerged LoRA delta. `adapters`:
        {name: folder} served unmerged side by side (`load_adapter`); `max_loras` (default: their
        count, at least 1 when given), `max_lora_rank`, `max_cpu_loras` as `enable_adapters`."""
        from .preprocess import ImageProcessor
        from .runtime import resolve_device, resolve_dtype
        from .tokenizer import Tokenizer
        from .weights.load import load_checkpoint
        from .weights.resolve import resolve

        files = resolve(model, tokenizer, mask_codec, revision)
        dev = resolve_device(device)
        bits = _check_quantize(files, quantize, group_size, keep_vision)
        net = load_checkpoint(files, device=dev, dtype=resolve_dtype(dtype, dev), adapter=adapter,
                              final_logit_softcap=final_logit_softcap, sliding_window=sliding_window)
        if bits is not None:  # after the adapter is merged into the float weights
            from .model.quant import plan, quantize_model

            quantize_model(net, plan(net, bits, group_size, keep_vision))
        tok = Tokenizer.from_file(files.tokenizer)
        size = net.config.vision.image_size
        proc = ImageProcessor.from_pretrained(files.preprocessor, default_size=size) if files.preprocessor else ImageProcessor(size=size)
        if proc.size != size:
            raise ValueError(f"preprocessor_config.json resizes to {proc.size}px but the model expects {size}px.")
        codec = None
        if files.mask_codec is not None:
            from .tasks.mask_codec import MaskCodec

            codec = MaskCodec.from_npz(files.mask_codec).to(dev).eval()
        name = Path(str(model)).name + (f"+{Path(adapter).resolve().name}" if adapter is not None else "")
        pg = cls(net, tok, proc, codec, compile=compile, name=name)
        if adapters or max_loras:
            pg.enable_adapters(max_loras or max(len(adapters or ()), 1), max_lora_rank, max_cpu_loras)
            for adapter_name, folder in (adapters or {}).items():
                pg.load_adapter(adapter_name, folder)
        return pg

    @property
    def quantization(self) -> str:
        """"none", "int8" or "int4 (group G)": how the weights are held."""
        spec = getattr(self.model, "quant_spec", None)
        return "none" if spec is None else spec.name

    def fingerprint(self) -> str:
        """A short hash of the weights (names, shapes, dtypes and a strided sample of each tensor's
        values): what `palikit eval` records so it never resumes with another model's predictions."""
        import hashlib

        h = hashlib.sha256()
        with torch.no_grad():
            for name, t in self.model.state_dict().items():
                flat = t.detach().reshape(-1)
                sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy()
                h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
                h.update(sample.tobytes())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------------------ images
    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _prepare(self, images: Sequence[Any]) -> list[tuple[torch.Tensor, str, tuple[int, int]]]:
        """Per example: model-ready pixels [F, 3, S, S] (several frames when an example is a list),
        their content key (the engine's image-feature cache) and the original (width, height) of the
        first frame. The same image object or path given twice is preprocessed once."""
        from .engine.features import pixel_key

        seen: dict[Any, tuple[torch.Tensor, str, tuple[int, int]]] = {}
        out = []
        for item in images:
            frames = list(item) if isinstance(item, (list, tuple)) else [item]
            key = tuple(_image_key(f) for f in frames)
            if key not in seen:
                pixel_values, frame_sizes = self.processor.preprocess_with_sizes(frames)
                seen[key] = (pixel_values, pixel_key(pixel_values), frame_sizes[0])
            out.append(seen[key])
        return out

    # ------------------------------------------------------------------------------ predict
    def predict(self, image, prompt: str, *, choices: Sequence[str] | None = None, **options) -> Any:
        """Run one prompt on one image (or a list of frames). Options (`tasks.options.PredictOptions`,
        as keywords or as `options=PredictOptions(...)`): max_new_tokens, temperature, top_k, top_p,
        seed, num_beams, length_penalty, coord_denominator (1024 or 1023), dedupe_iou, constrained
        (detect/segment output kept in its grammar: on by default, False for the raw model; see
        `tasks.constrain`); and labels (the requested labels: a list, or one string split by the label
        rule). `choices`: a closed set of answers to score instead of generating (`choose`)."""
        if choices is not None:
            return self.choose(image, prompt, choices)
        return self.predict_batch([image], [prompt], **options)[0]

    def choose(self, image, prompt: str, choices: Sequence[str]):
        """A closed-set answer: every choice scored as the answer to `prompt` in one batched
        teacher-forced pass on the engine (one prefill of the image and prompt, the choices as
        parallel continuations). `Result.choices`: per choice in the order given, `text`, `logprob` =
        log P(choice tokens + EOS | image, prompt) and `probability` (softmax over the set);
        `Result.text` is the most probable choice. Generation options do not apply (nothing is sampled)."""
        return self.submit_choices(image, prompt, choices).result()

    def submit_choices(self, image, prompt: str, choices, *, prompt_ids: Sequence[int] | None = None) -> PendingChoices:
        """Queue `choose` on the engine and return at once (thread-safe); `choices`: strings, or a
        `tasks.choices.ChoiceSet` already made by `prepare_choices`. ValueError for bad choices (none,
        more than 64, repeated, empty, tokenizing to nothing) before anything is queued."""
        from .tasks.choices import prepare_choices

        chosen = prepare_choices(self.tokenizer, choices)
        texts, ids = list(chosen.texts), [list(i) for i in chosen.ids]
        t0 = time.perf_counter()
        (pixel_values, key, size), = self._prepare([image])
        image_ms = (time.perf_counter() - t0) * 1e3
        prompt_ids = self.encode_prompt(prompt) if prompt_ids is None else _checked_ids(prompt_ids)
        future = self.engine.score(Request(prompt_ids, pixel_values=pixel_values, pixel_key=key), ids)
        return PendingChoices(future, prompt, size, texts, ids, image_ms)

    def classify(self, image, labels: str | Sequence[str], question: str = "what is in the image?",
                 lang: str = "en"):
        """The most probable of `labels` (a list, or one string split by the label rule) as the answer to
        `answer {lang} {question}`, with every label's probability (`choose`)."""
        from .tasks.labels import split_labels

        return self.answer(image, question, lang=lang, choices=split_labels(labels))

    def submit(self, image, prompt: str, *, labels: Sequence[str] | str | None = None, on_text=None,
               options: PredictOptions | None = None, prompt_ids: Sequence[int] | None = None,
               choices: Sequence[str] | None = None, constraint: Any = None, **kwargs) -> Pending:
        """Queue one prompt on the continuous-batching engine and return at once (thread-safe).
        `Pending.result()` is the Result; `on_text(piece)` is called (on the engine thread) with
        each new piece of text as it is generated. Options: a `PredictOptions` as `options=`, or
        keywords. `prompt_ids`: the prompt already tokenized by `encode_prompt` (the server checks
        its length before decoding the image, and the prompt is tokenized once). `choices`: score
        these answers instead of generating (`submit_choices`). `constraint`: a fresh token constraint
        for this generation (the engine's constraints interface, e.g. `tasks.structured.GrammarConstraint`)."""
        if choices is not None:
            return self.submit_choices(image, prompt, choices, prompt_ids=prompt_ids)
        opts = _options(options, kwargs)
        t0 = time.perf_counter()
        (pixel_values, key, size), = self._prepare([image])
        image_ms = (time.perf_counter() - t0) * 1e3
        ids = self.encode_prompt(prompt) if prompt_ids is None else _checked_ids(prompt_ids)
        request = Request(ids, pixel_values=pixel_values, pixel_key=key, constraint=constraint)
        return self._submit(request, prompt, size, requested_labels(labels), opts, _engine_options(opts), image_ms,
                            on_text)

    def _submit(self, request, prompt, size, labels, opts, gen_opts, image_ms, on_text=None) -> Pending:
        from .tasks.constrain import grammar_for_prompt

        grammar = None  # a caller's own constraint (structured outputs) wins over the detect/segment grammar
        if request.constraint is None:
            grammar = grammar_for_prompt(self.tokenizer, prompt, labels, opts.constrained, opts.num_beams)
        if grammar is not None:  # detect/segment output stays in its format (tasks/constrain.py)
            request.constraint = grammar.start(gen_opts.max_new_tokens)
            labels = grammar.labels
        if on_text is None:
            ticket = self.engine.submit(request, gen_opts)
            return Pending(self, ticket, prompt, size, labels, opts, image_ms, constrained=grammar is not None)
        from .tokenizer import TextStream

        stream, texts = TextStream(self.tokenizer), []  # the stream's per-token texts: the parser's too

        def on_token(token_id, _logprob):
            texts.append(stream.push(token_id))
            if texts[-1]:
                on_text(texts[-1])

        ticket = self.engine.submit(request, gen_opts, on_token)
        return Pending(self, ticket, prompt, size, labels, opts, image_ms, (texts, stream.flush),
                       constrained=grammar is not None)

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16,
                      labels: Sequence[Sequence[str] | None] | None = None, **options) -> list[Any]:
        """One prompt per image (an image may be a list of frames), all on the continuous-batching
        engine; `batch_size` bounds how many images are preprocessed ahead (memory), not the batch."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image.")
        opts = _options(options.pop("options", None), options)
        gen_opts = _engine_options(opts)
        labels = [requested_labels(x) for x in labels] if labels is not None else [None] * len(prompts)
        window = max(batch_size, 2 * self.engine.scheduler.max_slots)
        pending: list[Pending] = []
        waited = 0
        for start in range(0, len(prompts), window):
            while waited < len(pending) - window:  # bounded read-ahead: at most two windows in flight
                pending[waited].future.result()
                waited += 1
            t0 = time.perf_counter()
            prepared = self._prepare(images[start:start + window])
            image_ms = (time.perf_counter() - t0) * 1e3 / max(len(prepared), 1)
            for i, (pv, key, size) in enumerate(prepared, start):
                request = Request(self.encode_prompt(prompts[i]), pixel_values=pv, pixel_key=key)
                pending.append(self._submit(request, prompts[i], size, labels[i], opts, gen_opts, image_ms))
        return [p.result() for p in pending]

    def predict_pixels(self, pixel_values: torch.Tensor, sizes: Sequence[tuple[int, int]], prompts: Sequence[str], *,
                       labels: Sequence[Sequence[str] | None] | None = None, **options) -> list[Any]:
        """Like `predict_batch` for images already preprocessed elsewhere (e.g. on CPU workers):
        pixel_values [B, 3, S, S] or [B, F, 3, S, S]; sizes = original (width, height) per example."""
        from .engine.features import pixel_key

        if not (len(pixel_values) == len(sizes) == len(prompts)):
            raise ValueError("pixel_values, sizes and prompts must have the same length")
        opts = _options(options.pop("options", None), options)
        gen_opts = _engine_options(opts)
        labels = [requested_labels(x) for x in labels] if labels is not None else [None] * len(prompts)
        pending = []
        for pv, size, prompt, lab in zip(pixel_values, sizes, prompts, labels):
            pv = pv if pv.ndim == 4 else pv[None]  # [F, 3, S, S]
            request = Request(self.encode_prompt(prompt), pixel_values=pv, pixel_key=pixel_key(pv))
            pending.append(self._submit(request, prompt, tuple(size), lab, opts, gen_opts, 0.0))
        return [p.result() for p in pending]

    def stream(self, image, prompt: str, **options) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated (batched with everything
        else the engine runs; incremental detokenization)."""
        import queue

        pieces: queue.Queue = queue.Queue()
        done = object()
        pending = self.submit(image, prompt, on_text=pieces.put, **options)
        pending.future.add_done_callback(lambda _: pieces.put(done))
        try:
            while (piece := pieces.get()) is not done:
                yield piece
            pending.future.result()  # raise the engine's error, if any
        finally:
            pending.cancel()

    # ------------------------------------------------------------------------------ adapters
    def enable_adapters(self, max_loras: int = 4, max_lora_rank: int = 16, max_cpu_loras: int | None = None) -> None:
        """Serve LoRA adapters unmerged, many in one batch: `max_loras` on the device at once, ranks up
        to `max_lora_rank`, `max_cpu_loras` kept in CPU memory. Call before the first request (the
        first `load_adapter` does it with these defaults)."""
        self.engine.enable_adapters(max_loras, max_lora_rank, max_cpu_loras, max_rows=self.engine.scheduler.max_slots)

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        """Load a PEFT LoRA adapter folder (`palikit train`'s `output_dir/adapter`) under `name`; then
        `adapter=name` on predict / submit / predict_batch / stream / the task methods runs on it,
        batched with every other request. Errors (AdapterError, a ValueError) say what is wrong."""
        self.engine.load_adapter(name, path)

    def unload_adapter(self, name: str) -> None:
        """New requests for `name` are refused at once; the ones already submitted finish on it."""
        self.engine.unload_adapter(name)

    @property
    def adapters(self) -> list[str]:
        """The names of the loaded adapters."""
        return self.engine.adapter_names()

    def configure_scheduler(self, **settings) -> None:
        """Replace the engine's scheduler (max_slots, max_len, max_queue, image_cache_bytes); call
        when nothing is running."""
        self.engine.configure(**settings)

    def encode_prompt(self, prompt: str) -> list[int]:
        """The prompt's token ids ([BOS] prompt "\\n"), refused (ValueError) beyond MAX_PROMPT_TOKENS:
        what `submit(prompt_ids=)` takes from a caller that checks the prompt before the image."""
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        return _checked_ids(self.tokenizer.encode_prompt(prompt).ids)

    def _result(self, prompt, size, gen, labels, opts: PredictOptions, image_ms, streamed=None, constrained=False):
        """The Result of one generation: the ids turned into text once, by the parser (the stream's
        per-token texts when it was streamed), the masks of all instances in one codec call; a
        constrained one's labels in their requested spelling."""
        from .tasks import Result, suggest_prompt
        from .tasks.parse import detections_from_ids

        texts = None
        if streamed is not None and len(streamed[0]) == len(gen.tokens):  # (beam search streams nothing)
            pieces, flush = streamed
            texts = list(pieces)
            if texts:
                texts[-1] += flush()  # a character still held back belongs to the last token (token_texts)
        parsed = detections_from_ids(gen.tokens, gen.logprobs, self.tokenizer, size, requested_labels=labels,
                                     coord_denominator=opts.coord_denominator, token_texts=texts)
        detections = parsed.detections
        if constrained:
            from .tasks.constrain import fold_labels

            fold_labels(detections, labels)
        errors = list(parsed.errors)
        with_masks = [d for d in detections if d.seg_tokens]
        if with_masks:
            if self.mask_codec is None:
                errors.append("output has <seg> tokens but no mask codec is loaded (vae-oid.npz): masks not decoded")
            else:
                from .tasks.mask_codec import masks_from_tokens

                masks = masks_from_tokens(self.mask_codec, [d.seg_tokens for d in with_masks],
                                          [d.box for d in with_masks], size)
                for d, mask in zip(with_masks, masks):
                    d.mask = mask
        if opts.dedupe_iou is not None:
            from .tasks import dedupe

            detections = dedupe(detections, opts.dedupe_iou)
        timings = {"image_ms": image_ms, **gen.timings}
        return Result(text=parsed.decoded, prompt=prompt, image_size=size, detections=detections, errors=errors,
                      timings=timings, tokens=list(gen.tokens), token_logprobs=list(gen.logprobs),
                      hint=suggest_prompt(prompt, self.tokenizer))

    # ------------------------------------------------------------------------------ tasks
    def task(self, name: str, image, *args, lang: str = "en", choices: Sequence[str] | None = None, **options):
        """Run the task `name` of the task table (`palikit.tasks.registry`) on one image: positional
        `args` (or keywords) are the task's arguments (question, labels, ...), `lang` its language;
        `choices` (tasks that take them): score that closed set of answers instead (`choose`)."""
        from .tasks.registry import get_task

        t = get_task(name)
        if len(args) > len(t.args):
            raise ValueError(f"task {name} takes {len(t.args)} argument(s) ({', '.join(a.name for a in t.args)}), "
                             f"got {len(args)}")
        values = dict(zip((a.name for a in t.args), args))
        values.update({a.name: options.pop(a.name) for a in t.args if a.name in options})
        prompt, labels = t.prompt(values, lang)
        if choices is not None:
            if not t.choices:
                raise ValueError(f"task {name} takes no choices (a closed set of answers is scored for "
                                 "answer and predict)")
            return self.choose(image, prompt, choices)
        return self.predict_batch([image], [prompt], labels=[labels], **options)[0]

    def caption(self, image, lang: str = "en", **options):
        return self.task("caption", image, lang=lang, **options)

    def describe(self, image, lang: str = "en", **options):
        return self.task("describe", image, lang=lang, **options)

    def ocr(self, image, **options):
        return self.task("ocr", image, **options)

    def answer(self, image, question: str, lang: str = "en", *, choices: Sequence[str] | None = None, **options):
        """The answer to `question`; with `choices`, the most probable of them and every choice's
        probability (`choose`)."""
        return self.task("answer", image, question, lang=lang, choices=choices, **options)

    def question(self, image, answer: str, lang: str = "en", **options):
        return self.task("question", image, answer, lang=lang, **options)

    def detect(self, image, labels: str | Sequence[str], **options):
        """Boxes for `labels`: a list, or one string split by the label rule ("dog ; cat", "dog, cat")."""
        return self.task("detect", image, labels, **options)

    def segment(self, image, labels: str | Sequence[str], **options):
        return self.task("segment", image, labels, **options)

    def __getattr__(self, name: str):
        """Tasks registered later (`tasks.registry.register`) are methods too: `pg.<task>(image, *args)`."""
        from .tasks.registry import TASKS

        t = TASKS.get(name)
        if t is None or not t.api or name.startswith("_"):
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return lambda image, *args, **options: self.task(name, image, *args, **options)


class Pending:
    """A submitted prompt: `result()` waits for it and builds its Result (parsing, masks) in the
    calling thread; `t_submit`, `t_first_token`, `t_done` are perf_counter stamps from the engine."""

    def __init__(self, pg: PaliGemma, ticket, prompt, size, labels, opts, image_ms, streamed=None, constrained=False):
        self._pg, self.ticket = pg, ticket
        self._args = (prompt, size, ticket, labels, opts, image_ms, streamed, constrained)

    @property
    def future(self):
        return self.ticket.future

    t_submit = property(lambda self: self.ticket.t_submit)
    t_first_token = property(lambda self: self.ticket.t_first_token)
    t_done = property(lambda self: self.ticket.t_done)

    def cancel(self) -> None:
        self.ticket.cancel()

    def result(self, timeout: float | None = None):
        prompt, size, ticket, labels, opts, image_ms, streamed, constrained = self._args
        return self._pg._result(prompt, size, ticket.result(timeout), labels, opts, image_ms, streamed, constrained)


class PendingChoices:
    """A queued closed-set answer (`PaliGemma.submit_choices`): `result()` waits and builds its Result."""

    def __init__(self, future, prompt, size, texts, ids, image_ms):
        self.future = future
        self._args = (prompt, size, texts, ids, image_ms)
        self.t_submit = self.t_done = time.perf_counter()
        future.add_done_callback(lambda _: setattr(self, "t_done", time.perf_counter()))

    def cancel(self) -> None:
        self.future.cancel()

    def result(self, timeout: float | None = None):
        from .tasks import Result, suggest_prompt
        from .tasks.choices import best, rank_choices

        prompt, size, texts, ids, image_ms = self._args
        scores = rank_choices(texts, ids, self.future.result(timeout))
        top = best(scores)
        timings = {"image_ms": image_ms, "score_ms": (self.t_done - self.t_submit) * 1e3}
        return Result(text=top.text, prompt=prompt, image_size=size, timings=timings, tokens=list(top.tokens),
                      token_logprobs=list(top.token_logprobs[:-1]), hint=suggest_prompt(prompt), choices=scores)


def _options(options: PredictOptions | None, kwargs: dict) -> PredictOptions:
    """The caller's options: a `PredictOptions` as is, or keyword options converted once."""
    if options is None:
        return PredictOptions.from_kwargs(kwargs)
    if kwargs:
        raise ValueError(f"give options= or keyword options ({', '.join(sorted(kwargs))}), not both")
    if not isinstance(options, PredictOptions):
        raise ValueError(f"options= takes a PredictOptions, got {type(options).__name__}; or pass keywords")
    return options


def _engine_options(opts: PredictOptions) -> GenerationOptions:
    """`PredictOptions` -> the engine's `GenerationOptions` (the parsing options stay with the Result)."""
    sampling = SamplingOptions(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, seed=opts.seed)
    return GenerationOptions(max_new_tokens=opts.max_new_tokens, sampling=sampling, num_beams=opts.num_beams,
                             length_penalty=opts.length_penalty, adapter=opts.adapter)


def _checked_ids(ids: Sequence[int]) -> list[int]:
    ids = list(ids)
    if len(ids) > MAX_PROMPT_TOKENS:
        raise ValueError(f"prompt is {len(ids)} tokens; the limit is {MAX_PROMPT_TOKENS}. Shorten it.")
    return ids


def _image_key(image) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return ("path", str(Path(image).resolve()))
    if isinstance(image, bytes):
        return ("bytes", hash(image))
    return ("object", id(image))


def _check_quantize(files, quantize, group_size, keep_vision) -> int | None:
    """`quantize=` as bits (None: none), refused for a folder `palikit quantize` wrote (before loading)."""
    from .model.quant import parse_quantize
    from .weights.quantized import folder_spec

    bits = parse_quantize(quantize)
    if bits is None and (group_size is not None or keep_vision):
        raise ValueError("group_size / keep_vision apply with quantize='int8' or 'int4' only")
    spec = folder_spec(files.weights) if bits is not None and files.format == "hf" else None
    if spec is not None:
        raise ValueError(f"{files.weights} is already quantized ({spec.name}); load it without --quantize")
    return bits
