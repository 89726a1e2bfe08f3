"""Helpers of the training tests: a word-level stand-in with the `palikit.tokenizer.Tokenizer.encode_prompt`
contract, a minimal image processor with `preprocess_with_sizes`, a tiny random model, a tiny JSONL data
set on disk, a run's config, and one rank of a spawned gloo group (DDP / FSDP tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from palikit.config import PRESETS

WORDS = ["caption", "en", "describe", "a", "red", "blue", "green", "yellow", "square", "circle", "big", "small",
         "cat", "dog", "on", "the", "left", "right", "detect", "segment", "answer", "what"]


@dataclass
class PromptTokens:
    ids: list[int]
    ar_mask: list[int]
    loss_mask: list[int]
    prefix_len: int


class WordTokenizer:
    """ids: 0 pad, 1 eos, 2 bos, 3 unk, 4 "\\n", then WORDS (split on spaces)."""

    pad_id, eos_id, bos_id, unk_id, newline_id = 0, 1, 2, 3, 4

    def __init__(self, words=WORDS):
        self.words = list(words)
        self.vocab = {w: i + 5 for i, w in enumerate(self.words)}
        self.vocab_size = 5 + len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.vocab.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids) -> str:
        inv = {v: k for k, v in self.vocab.items()}
        return " ".join(inv[i] for i in ids if i in inv)

    def encode_prompt(self, prefix: str, suffix: str | None = None, max_len: int | None = None) -> PromptTokens:
        pre = [self.bos_id] + self.encode(prefix) + [self.newline_id]
        suf = [] if suffix is None else self.encode(suffix) + [self.eos_id]
        ids = pre + suf
        ar = [0] * len(pre) + [1] * len(suf)
        loss = [0] * len(pre) + [1] * len(suf)
        if max_len is not None:
            ids, ar, loss = ids[:max_len], ar[:max_len], loss[:max_len]
        return PromptTokens(ids, ar, loss, len(pre))


class SimpleImageProcessor:
    """Resize (bilinear) to size x size, scale to [-1, 1] -- PaliGemma's preprocessing."""

    def __init__(self, size: int = 28):
        self.size = size

    def preprocess_with_sizes(self, images):
        from PIL import Image

        arrs, sizes = [], []
        for im in images:
            sizes.append(im.size)
            im = im.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
            arrs.append(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
        return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous(), sizes


def tiny_config(family: str = "pg1"):
    return replace(PRESETS[f"tiny-{family}"], name=f"tiny-{family}-train")


def tiny_model(family: str = "pg1", seed: int = 0):
    from palikit.testing import random_model

    model = random_model(tiny_config(family), "cpu", torch.float32, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.ndim > 1:
                p.mul_(5.0)
    return model.train()


COLORS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30), "yellow": (230, 230, 20)}
SUFFIXES = {"red": "a big red square on the left", "blue": "a small blue circle",
            "green": "the green cat on the right", "yellow": "a yellow dog"}


def write_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, rgb in COLORS.items():
        arr = np.zeros((32, 32, 3), dtype=np.uint8)
        arr[:] = rgb
        arr[:16, :16] = 255 - np.array(rgb, dtype=np.uint8)  # a corner so images are not flat
        p = folder / f"{name}.png"
        Image.fromarray(arr).save(p)
        out[name] = p
    return out


def write_dataset(folder: Path, name: str = "train.jsonl") -> Path:
    """4 examples, relative image paths, distinct prefixes and suffixes."""
    write_images(folder / "images")
    lines = [json.dumps({"image": f"images/{c}.png", "prefix": f"caption en {c}" if i % 2 else "caption en",
                         "suffix": SUFFIXES[c]}) for i, c in enumerate(COLORS)]
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def save_tiny_checkpoint(folder: Path, family: str = "pg1", seed: int = 0) -> Path:
    from palikit.weights.export import save_hub_checkpoint

    return save_hub_checkpoint(tiny_model(family, seed), folder)


def max_param_diff(a: dict, b: dict) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


# ------------------------------------------------------------------ end-to-end runs
def run_config(tmp_path, out="out", **over):
    from palikit.train.config import TrainConfig

    base = dict(model=str(tmp_path / "base"), train_data=str(tmp_path / "data" / "train.jsonl"),
                output_dir=str(tmp_path / out), batch_size=4, lr=3e-3, warmup=2, max_steps=6, progress=False,
                log_every=1, seed=0)
    base.update(over)
    return TrainConfig(**base)


def setup_run(tmp_path, family="pg1"):
    """A tiny Hub-layout base checkpoint in tmp/base and the 4-example data set in tmp/data."""
    if not (tmp_path / "base").exists():
        save_tiny_checkpoint(tmp_path / "base", family)
        write_dataset(tmp_path / "data")


def run_kwargs():
    return dict(tokenizer=WordTokenizer(), image_processor=SimpleImageProcessor(28), log=lambda m: None)


def distributed_worker(rank, world, port, cfg_dicts):
    """One rank of a spawned gloo group running `train` once per config (DDP or FSDP tests)."""
    import os

    import torch.distributed as dist

    from palikit.train.config import TrainConfig
    from palikit.train.trainer import train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    dist.init_process_group("gloo")  # one group for several runs (train() reuses an existing one)
    try:
        for d in cfg_dicts:
            train(TrainConfig(**d), **run_kwargs())
    finally:
        dist.destroy_process_group()
