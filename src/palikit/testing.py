"""Tiny random checkpoints in the real on-disk format (Hub-layout config.json + safetensors +
tokenizer.json + preprocessor_config.json), for tests, examples and smoke runs of the server and
batch jobs without downloading anything. Their outputs are random text: they exercise the
machinery, not the model's skill (the bundled demo model is the trained one)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

WORDS = ["a", "the", "red", "blue", "green", "circle", "square", "triangle", "cat", "dog", "car", "on", "in",
         "caption", "describe", "detect", "segment", "answer", "question", "ocr", "en", "how", "many", "what",
         "color", "is", "there", "are", "of", "picture", "text"]
CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,;:!?'\"-()/")


def make_tiny_checkpoint(folder: str | Path, family: str = "pg1", seed: int = 0, image_size: int = 28) -> Path:
    """Write a random tiny PaliGemma (family "pg1" or "pg2") with a PaliGemma-style tokenizer."""
    import torch

    from .config import PRESETS
    from .engine.bench import random_model
    from .preprocess import ImageProcessor
    from .tokenizer import build_tokenizer
    from .weights.export import save_hub_checkpoint

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(WORDS + CHARS, folder / "tokenizer.json")
    image_id = tok.vocab_size - 1  # build_tokenizer puts <image> last
    base = PRESETS[f"tiny-{family}"]
    cfg = replace(base, text=replace(base.text, vocab_size=tok.vocab_size), image_token_index=image_id,
                  name=f"tiny-{family}-random").with_image_size(image_size)
    torch.manual_seed(seed)
    model = random_model(cfg, "cpu", torch.float32, seed=seed)
    with torch.no_grad():  # make outputs less degenerate than N(0, 0.02) weights give
        for p in model.parameters():
            if p.ndim > 1:
                p.mul_(5.0)
    save_hub_checkpoint(model, folder)
    ImageProcessor(size=image_size, patch_size=cfg.vision.patch_size).save(folder)
    return folder
