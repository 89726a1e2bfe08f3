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
        self.engine = Engine(model, eos_ids=(tokenizer.eos_id,), compile=compile)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, device: str = "auto", dtype: str | torch.dtype = "auto",
                        tokenizer: str | os.PathLike | None = None, mask_codec: str | os.PathLike | None = None,
                        revision: str | None = None, compile: bool = False,
                        adapter: str | os.PathLike | None = None) -> PaliGemma:
        """`model`: a Hub-layout folder, a big_vision `.npz` (tokenizer next to it or `tokenizer=`), or a
        Hub id such as `google/paligemma2-3b-mix-224` (cache and HF_HUB_OFFLINE honoured). `adapter`: a
        LoRA adapter folder in PEFT format (`palikit train`'s `output_dir/adapter`), merged into the weights."""
        from .preprocess import ImageProcessor
        from .runtime import resolve_device, resolve_dtype
        from .tokenizer import Tokenizer
        from .weights.resolve import resolve

        files = resolve(model, tokenizer, mask_codec, revision)
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if files.format == "npz":
            from .weights.big_vision import load_npz_checkpoint

            net = load_npz_checkpoint(files.weights, device=dev, dtype=dt)
        else:
            from .weights.hf import load_hf_checkpoint

            net = load_hf_checkpoint(files.weights, device=dev, dtype=dt)
        if adapter is not None:
            from .train.adapter import load_lora_adapter

            load_lora_adapter(net, adapter, merge=True)
        tok = Tokenizer.from_file(files.tokenizer)
        size = net.config.vision.image_size
        proc = ImageProcessor.from_pretrained(files.preprocessor, default_size=size) if files.preprocessor else ImageProcessor(size=size)
        if proc.size != size:
            raise ValueError(f"preprocessor_config.json resizes to {proc.size}px but the model expects {size}px.")
        codec = None
        if files.mask_codec is not None:
            from .tasks.mask_codec import MaskCodec

            codec = MaskCodec.from_npz(files.mask_codec).to(dev).eval()
        return cls(net, tok, proc, codec, compile=compile, name=Path(str(model)).name)

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

    def _encode(self, images: Sequence[Any]) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
        """Image features per example ([F*N, H]; several frames when an example is a list) and the
        original (width, height) of each example's first frame. Repeated images are encoded once."""
        cache: dict[Any, tuple[torch.Tensor, tuple[int, int]]] = {}
        feats, sizes = [], []
        for item in images:
            frames = list(item) if isinstance(item, (list, tuple)) else [item]
            key = tuple(_image_key(f) for f in frames)
            if key not in cache:
                pixel_values, frame_sizes = self.processor.preprocess_with_sizes(frames)
                w = self.model.vision_tower.embeddings.patch_embedding.weight
                with torch.inference_mode():
                    f = self.model.embed_images(pixel_values.to(w.device, w.dtype)[None])[0]  # [F*N, H]
                cache[key] = (f, frame_sizes[0])
            f, size = cache[key]
            feats.append(f)
            sizes.append(size)
        return feats, sizes

    # ------------------------------------------------------------------------------ predict
    def predict(self, image, prompt: str, **options) -> Any:
        """Run one prompt on one image (or a list of frames). Options: max_new_tokens, temperature,
        top_k, top_p, seed, num_beams, coord_denominator (1024 or 1023), dedupe_iou, labels."""
        return self.predict_batch([image], [prompt], **options)[0]

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], *, batch_size: int = 16,
                      labels: Sequence[Sequence[str] | None] | None = None, **options) -> list[Any]:
        """One prompt per image (an image may be a list of frames). Repeated images are encoded once."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one prompt per image.")
        gen_opts, parse_opts = _split_options(options)
        labels = list(labels) if labels is not None else [None] * len(prompts)
        results = []
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            t0 = time.perf_counter()
            feats, sizes = self._encode(images[start:end])
            t_img = (time.perf_counter() - t0) * 1e3
            results += self._generate(feats, sizes, prompts[start:end], labels[start:end], gen_opts, parse_opts, t_img)
        return results

    def predict_pixels(self, pixel_values: torch.Tensor, sizes: Sequence[tuple[int, int]], prompts: Sequence[str], *,
                       labels: Sequence[Sequence[str] | None] | None = None, **options) -> list[Any]:
        """Like `predict_batch` for images already preprocessed elsewhere (e.g. on CPU workers):
        pixel_values [B, 3, S, S] or [B, F, 3, S, S]; sizes = original (width, height) per example."""
        if not (len(pixel_values) == len(sizes) == len(prompts)):
            raise ValueError("pixel_values, sizes and prompts must have the same length")
        gen_opts, parse_opts = _split_options(options)
        t0 = time.perf_counter()
        w = self.model.vision_tower.embeddings.patch_embedding.weight
        pv = pixel_values.to(w.device, w.dtype)
        with torch.inference_mode():
            feats = self.model.embed_images(pv if pv.ndim == 5 else pv[:, None])  # [B, F*N, H]
        t_img = (time.perf_counter() - t0) * 1e3
        labels = list(labels) if labels is not None else [None] * len(prompts)
        return self._generate(list(feats), list(sizes), prompts, labels, gen_opts, parse_opts, t_img)

    def _generate(self, feats, sizes, prompts, labels, gen_opts, parse_opts, image_ms) -> list[Any]:
        requests = [Request(self._prompt_ids(p), f) for p, f in zip(prompts, feats)]
        gens = self.engine.generate(requests, gen_opts)
        return [self._result(p, size, gen, lab, parse_opts, image_ms / len(prompts))
                for p, size, gen, lab in zip(prompts, sizes, gens, labels)]

    def stream(self, image, prompt: str, **options) -> Iterator[str]:
        """Yield the answer's text piece by piece as tokens are generated."""
        gen_opts, _ = _split_options(options)
        feats, _ = self._encode([image])
        emitted = []
        for tokens, _ in self.engine.stream([Request(self._prompt_ids(prompt), feats[0])], gen_opts):
            t = int(tokens[0])
            if t in self.engine.eos_ids:
                return
            emitted.append(t)
            yield self.tokenizer.token_texts(emitted, final=False)[-1]

    def _prompt_ids(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt must be a string, got {type(prompt).__name__}")
        ids = self.tokenizer.encode_prompt(prompt).ids
        if len(ids) > MAX_PROMPT_TOKENS:
            raise ValueError(f"prompt is {len(ids)} tokens; the limit is {MAX_PROMPT_TOKENS}. Shorten it.")
        return ids

    def _result(self, prompt, size, gen, labels, parse_opts, image_ms):
        from .tasks import Result, parse_detections, suggest_prompt

        tok = self.tokenizer
        text = tok.decode(gen.tokens)
        parsed = parse_detections(
            text, size, requested_labels=labels, coord_denominator=parse_opts["coord_denominator"],
            token_texts=tok.token_texts(gen.tokens), token_logprobs=gen.logprobs,
        )
        detections = parsed.detections
        errors = list(parsed.errors)
        if any(d.seg_tokens for d in detections):
            if self.mask_codec is None:
                errors.append("output has <seg> tokens but no mask codec is loaded (vae-oid.npz): masks not decoded")
            else:
                from .tasks.mask_codec import mask_from_tokens

                for d in detections:
                    if d.seg_tokens:
                        d.mask = mask_from_tokens(self.mask_codec, d.seg_tokens, d.box, size)
        if parse_opts["dedupe_iou"] is not None:
            from .tasks import dedupe

            detections = dedupe(detections, parse_opts["dedupe_iou"])
        timings = {"image_ms": image_ms, **gen.timings}
        return Result(text=text, prompt=prompt, image_size=size, detections=detections, errors=errors,
                      timings=timings, tokens=list(gen.tokens), token_logprobs=list(gen.logprobs),
                      hint=suggest_prompt(prompt))

    # ------------------------------------------------------------------------------ tasks
    def caption(self, image, lang: str = "en", **options):
        from .tasks import prompts

        return self.predict(image, prompts.caption(lang), **options)

    def describe(self, image, lang: str = "en", **options):
        from .tasks import prompts

        return self.predict(image, prompts.describe(lang), **options)

    def ocr(self, image, **options):
        from .tasks import prompts

        return self.predict(image, prompts.ocr(), **options)

    def answer(self, image, question: str, lang: str = "en", **options):
        from .tasks import prompts

        return self.predict(image, prompts.answer(question, lang), **options)

    def question(self, image, answer: str, lang: str = "en", **options):
        from .tasks import prompts

        return self.predict(image, prompts.question(answer, lang), **options)

    def detect(self, image, labels: str | Sequence[str], **options):
        from .tasks import prompts

        labels = [labels] if isinstance(labels, str) else list(labels)
        return self.predict_batch([image], [prompts.detect(labels)], labels=[labels], **options)[0]

    def segment(self, image, labels: str | Sequence[str], **options):
        from .tasks import prompts

        labels = [labels] if isinstance(labels, str) else list(labels)
        return self.predict_batch([image], [prompts.segment(labels)], labels=[labels], **options)[0]


def _split_options(options: dict) -> tuple[GenerationOptions, dict]:
    opts = dict(options)
    parse = {"coord_denominator": opts.pop("coord_denominator", 1024), "dedupe_iou": opts.pop("dedupe_iou", None)}
    if parse["coord_denominator"] not in (1023, 1024):
        raise ValueError("coord_denominator must be 1024 (official demo) or 1023 (big_vision RefCOCO)")
    sampling = SamplingOptions(
        temperature=opts.pop("temperature", 0.0), top_k=opts.pop("top_k", None),
        top_p=opts.pop("top_p", None), seed=opts.pop("seed", None),
    )
    gen = GenerationOptions(
        max_new_tokens=opts.pop("max_new_tokens", 64), sampling=sampling,
        num_beams=opts.pop("num_beams", 1), length_penalty=opts.pop("length_penalty", 1.0),
    )
    if opts:
        raise ValueError(f"unknown option(s): {', '.join(sorted(opts))}")
    return gen, parse


def _image_key(image) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return ("path", str(Path(image).resolve()))
    if isinstance(image, bytes):
        return ("bytes", hash(image))
    return ("object", id(image))
