"""Training batches in big_vision's layout (`combine_and_keep_train`) and the two losses.

Row layout (right-padded; pads are masked out of attention and out of the loss):

    [image placeholders x N] [BOS] prefix ["\\n"] suffix [EOS] [PAD ...]
    ar_mask:   0 ... 0        0     0 ... 0   0    1 ... 1    1     1 ...
    loss_mask: 0 ... 0        0     0 ... 0   0    1 ... 1    1     0 ...
    attention: 1 ...                                                0 ...

The model sees the whole row; token t predicts token t+1, weighted by `loss_mask[t+1]` -- so the
loss is on suffix + EOS only (the `"\\n"` position predicts the first suffix token).

Losses (`loss_terms` returns numerator and denominator so gradient accumulation and data
parallelism give exactly the full-batch value):
- `"big_vision"`: per-example mean NLL over its loss tokens (sum / max(count, 1)), then the mean
  over examples (big_vision trainer and the fine-tuning colab).
- `"hf"`: the mean over every supervised token in the batch (transformers' `ForCausalLMLoss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import PaliGemmaConfig
from .data import Example

BATCH_KEYS = ("input_ids", "attention_mask", "ar_mask", "loss_mask")


class ExampleError(ValueError):
    """One example cannot be used (an unreadable image, a row longer than max_len with long_rows=refuse):
    the message starts with its origin (`file:line`); `example` is the example, so a caller that skips
    bad examples (strict_data=false) can drop it from its batch."""

    def __init__(self, example: Example, message: str):
        super().__init__(message)
        self.example = example


def text_length(tokenizer, ex: Example) -> int:
    """Text tokens of an example: `[BOS] prefix "\\n" suffix [EOS]` (the image tokens come on top)."""
    return len(tokenizer.encode_prompt(ex.prefix, ex.suffix).ids)


def too_long(ex: Example, n: int, max_len: int) -> str:
    return (f"{ex.source}: {n} text tokens, more than max_len={max_len}: shorten the row, raise max_len, or set "
            "long_rows=truncate to cut its tail")


def long_rows(tokenizer, examples: Sequence[Example], max_len: int) -> tuple[list[int], list[str]]:
    """(the text length of every example, a message for each one longer than `max_len`). One tokenizer
    pass; a 100,000-character row costs its tokens, never an attention matrix."""
    lengths = [text_length(tokenizer, ex) for ex in examples]
    return lengths, [too_long(ex, n, max_len) for ex, n in zip(examples, lengths) if n > max_len]


def load_image(path):
    """palikit's loader when available (EXIF, modes, clear errors), else PIL -> RGB."""
    try:
        from palikit.preprocess import load_image as _load
    except ImportError:
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")
    return _load(path)


def default_image_processor(config: PaliGemmaConfig, model_folder=None):
    """The checkpoint's own `preprocessor_config.json` when there is one (what inference uses),
    else PaliGemma's defaults at the model's resolution."""
    from palikit.preprocess import ImageProcessor

    size = config.vision.image_size
    if model_folder is not None:
        return ImageProcessor.from_pretrained(model_folder, default_size=size)
    return ImageProcessor(size=size)


@dataclass
class Collator:
    """examples -> dict of tensors: input_ids, attention_mask, ar_mask, loss_mask [B, T] (long) and
    pixel_values [B, 3, S, S].

    `tokenizer.encode_prompt(prefix, suffix, max_len)` gives `[BOS] prefix ["\\n"] suffix [EOS]`
    with its ar/loss masks; `image_processor.preprocess_with_sizes(images)` the pixels.
    `max_len` caps the text tokens per example (the tail is cut, as big_vision does);
    `pad_to_max_len` pads every batch to `N + max_len` (fixed shapes), else to the longest row.
    `cache_images` keeps each file's preprocessed pixels in memory after its first use (3 x S x S
    float32 per image: 150 KB at 112 px), which takes image decoding off every later step.
    `refuse_longer`: an example longer than `max_len` raises `ExampleError` instead of being cut
    (`long_rows=refuse`; file data is checked up front, this catches what a `train_source` hook makes).
    An unreadable image raises `ExampleError` too.
    """

    tokenizer: object
    image_processor: object
    config: PaliGemmaConfig
    max_len: int | None = None
    pad_to_max_len: bool = False
    cache_images: bool = False
    refuse_longer: bool = False
    _pixels: dict = field(default_factory=dict, repr=False)  # image path -> [3, S, S] float32

    def encode_text(self, ex: Example) -> tuple[list[int], list[int], list[int]]:
        if self.refuse_longer and self.max_len is not None:
            pt = self.tokenizer.encode_prompt(ex.prefix, ex.suffix)
            if len(pt.ids) > self.max_len:
                raise ExampleError(ex, too_long(ex, len(pt.ids), self.max_len))
        else:
            pt = self.tokenizer.encode_prompt(ex.prefix, ex.suffix, max_len=self.max_len)
        ids, ar, loss = list(pt.ids), list(pt.ar_mask), list(pt.loss_mask)
        if self.max_len is not None and len(ids) > self.max_len:  # the tokenizer should cut; make sure
            ids, ar, loss = ids[: self.max_len], ar[: self.max_len], loss[: self.max_len]
        return ids, ar, loss

    def __call__(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        cfg = self.config
        N = cfg.vision.num_image_tokens
        texts = [self.encode_text(ex) for ex in examples]
        pixel_values = self.pixels(examples)
        longest = max(len(t[0]) for t in texts)
        T = N + (self.max_len if self.pad_to_max_len else longest)
        B = len(examples)
        input_ids = torch.full((B, T), cfg.pad_token_id, dtype=torch.long)
        attention = torch.zeros(B, T, dtype=torch.long)
        ar_mask = torch.ones(B, T, dtype=torch.long)
        loss_mask = torch.zeros(B, T, dtype=torch.long)
        for b, (ids, ar, loss) in enumerate(texts):
            n = N + len(ids)
            input_ids[b, :n] = torch.tensor(cfg.prompt_row(ids))
            attention[b, :n] = 1
            ar_mask[b, :N] = 0
            ar_mask[b, N:n] = torch.tensor(ar)
            loss_mask[b, N:n] = torch.tensor(loss)
        return dict(input_ids=input_ids, attention_mask=attention, ar_mask=ar_mask, loss_mask=loss_mask,
                    pixel_values=pixel_values)

    def pixels(self, examples: Sequence[Example]) -> torch.Tensor:
        """[B, 3, S, S] float32 pixels of the examples' images (from the cache where allowed)."""
        def cacheable(ex):
            return self.cache_images and isinstance(ex.image, (str, Path))

        hit = [cacheable(ex) and str(ex.image) in self._pixels for ex in examples]
        images = []
        for ex, cached in zip(examples, hit):
            if cached:
                continue
            try:
                images.append(load_image(ex.image))
            except Exception as e:  # noqa: BLE001 - reported with the example's origin
                raise ExampleError(ex, f"{ex.source}: cannot read image {ex.image}: {e}") from None
        fresh = []
        if images:
            values, _ = self.image_processor.preprocess_with_sizes(images)
            fresh = list(torch.as_tensor(values, dtype=torch.float32))  # B x [3, S, S]
        made = iter(fresh)
        out = []
        for ex, cached in zip(examples, hit):
            if cached:
                out.append(self._pixels[str(ex.image)])
                continue
            px = next(made)
            if cacheable(ex):
                self._pixels.setdefault(str(ex.image), px.clone())  # own storage, not a view of the batch
            out.append(px)
        return torch.stack(out)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_nll(model, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL [B, T-1] (fp32, 0 where not supervised) and the weights [B, T-1].

    Logits are computed only at supervised positions (memory: K x V instead of B x T x V).
    `label_smoothing` > 0 gives the smoothed cross-entropy (target 1 - e, e spread over the vocab)."""
    hidden = model(batch["input_ids"], batch["pixel_values"], attention_mask=batch["attention_mask"],
                   ar_mask=batch["ar_mask"], return_hidden=True)
    weights = (batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).bool()
    logits = model.logits(hidden[:, :-1][weights]).float()  # [K, V]
    targets = batch["input_ids"][:, 1:][weights]
    nll = F.cross_entropy(logits, targets, reduction="none", label_smoothing=label_smoothing)
    full = torch.zeros(weights.shape, dtype=nll.dtype, device=nll.device)
    return full.masked_scatter(weights, nll), weights


def loss_denominator(batch: dict[str, torch.Tensor], kind: str = "big_vision") -> float:
    """What `loss_terms`' numerator is divided by: examples (big_vision) or supervised tokens (hf)."""
    if kind == "big_vision":
        return float(batch["input_ids"].shape[0])
    if kind == "hf":
        return float((batch["loss_mask"][:, 1:] * batch["attention_mask"][:, 1:]).sum())
    raise ValueError(f"unknown loss {kind!r}; use big_vision or hf")


def loss_terms(nll: torch.Tensor, weights: torch.Tensor, kind: str = "big_vision") -> torch.Tensor:
    """The loss numerator: sum of per-example means (big_vision) or sum of token NLLs (hf)."""
    if kind == "big_vision":
        counts = weights.sum(1).clamp(min=1)
        return (nll.sum(1) / counts).sum()
    if kind == "hf":
        return nll.sum()
    raise ValueError(f"unknown loss {kind!r}; use big_vision or hf")


def batch_loss(model, batch: dict[str, torch.Tensor], kind: str = "big_vision") -> torch.Tensor:
    """The scalar loss of one batch."""
    nll, w = token_nll(model, batch)
    return loss_terms(nll, w, kind) / max(loss_denominator(batch, kind), 1.0)


def hf_labels(batch: dict[str, torch.Tensor], ignore_index: int = -100) -> torch.Tensor:
    """transformers' `labels` for the same batch: the input ids, -100 where there is no loss."""
    keep = (batch["loss_mask"] * batch["attention_mask"]).bool()
    return torch.where(keep, batch["input_ids"], torch.full_like(batch["input_ids"], ignore_index))
