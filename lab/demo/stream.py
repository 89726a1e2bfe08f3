"""Shapes v2 training examples made on the fly (issue 19): example i is one task row of a fresh
image, `shapes2.make_sample(i, STREAM_SEED + seed)`, so a run never sees an image twice, needs no
disk and no data build, and cannot memorise boxes (with 10,000 stored images the demo model did).

Use it from a recipe instead of `train_data` (the mask codec makes the `<seg>` codes; without
`mask_codec` there are no segment rows):

    train_source: lab.demo.stream:shapes2_source     # run from the checkout (lab/README.md)
    mask_codec: work/demo2/vae-oid.npz
    data_workers: 8          # generation is CPU work: give it processes on a GPU machine

Each example picks one of its image's rows (`shapes2.examples`: caption, detect incl. absent
classes, segment, referring detect / segment, ocr, count, colour) uniformly, so the task mix is
the stored build's. Example i is the same on every call and in every process (its own RNGs), which
is what resuming and `data_workers` need. `STREAM_SEED` keeps the images apart from the stored
splits' seeds (`shapes.SPLIT_SEEDS`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from palikit.demo import shapes2
from palikit.train.data import Example

from palikit.demo.splits import codec_seg_fn

STREAM_SEED = 3_000_017  # not a split seed (0, 1_000_003, 2_000_003)
SEGMENT_TASKS = ("segment", "refer_segment")


class ShapesStream(Sequence):
    """`n` generated examples (`Example.image` is a PIL image)."""

    def __init__(self, n: int, seed: int = 0, mask_codec: str | Path | None = None, size=None,
                 classes: tuple[str, ...] = shapes2.CLASSES, tasks: Sequence[str] | None = None):
        if n < 1:
            raise ValueError(f"a generated training set needs n >= 1 examples, got {n}")
        self.n, self.seed, self.size, self.classes = n, seed, size, tuple(classes)
        self.codec_path = str(mask_codec) if mask_codec else None
        self.tasks = set(tasks) if tasks else None
        self._codec = None  # loaded on first use, in the process that uses it

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict:  # to worker processes without the loaded codec
        return {**self.__dict__, "_codec": None}

    def __getitem__(self, i: int) -> Example:
        if not 0 <= i < self.n:
            raise IndexError(f"example {i} of a generated set of {self.n}")
        sample = shapes2.make_sample(i, STREAM_SEED + self.seed, self.size, classes=self.classes)
        rows_seed = (STREAM_SEED + self.seed) * 7_919 + i
        placeholder = (lambda shape: [0] * 16) if self.codec_path else None
        rows = self._rows(sample, rows_seed, placeholder)
        pick = random.Random(rows_seed + 1).randrange(len(rows))
        row = rows[pick]
        if row["task"] in SEGMENT_TASKS:  # the same rows again, now with the real codes (encoding is the slow part)
            row = self._rows(sample, rows_seed, self._seg_fn())[pick]
        return Example(sample.image, row["prefix"], row["suffix"], f"shapes2 stream #{i} (seed {self.seed})", row["task"])

    def _rows(self, sample, rows_seed: int, seg_fn) -> list[dict]:
        rows = shapes2.examples(sample, random.Random(rows_seed), seg_fn, self.classes)
        if self.tasks is None:
            return rows
        kept = [r for r in rows if r["task"] in self.tasks]
        return kept or [r for r in rows if r["task"] == "detect"][:1]  # every image has a detect row

    def _seg_fn(self):
        if self._codec is None:
            from palikit.tasks.mask_codec import MaskCodec

            self._codec = MaskCodec.from_npz(self.codec_path)
        return codec_seg_fn(self._codec)


def shapes2_source(cfg) -> ShapesStream:
    """The `train_source` hook: `max_steps x batch_size` fresh examples (each seen once), the
    recipe's `seed`, `mask_codec` and `tasks`."""
    if not cfg.max_steps:
        raise ValueError("train_source=lab.demo.stream:shapes2_source makes a fresh image for every example: "
                         "set max_steps (epochs mean nothing here)")
    if cfg.mask_codec and not Path(cfg.mask_codec).is_file():
        raise ValueError(f"mask_codec={cfg.mask_codec!r}: file not found (the codec comes from "
                         "python -m lab.demo.build --version 2; it makes the segment rows' <seg> codes)")
    unknown = sorted(set(cfg.tasks or ()) - set(shapes2.TASKS))
    if unknown:
        raise ValueError(f"tasks: {', '.join(unknown)} are not shapes v2 tasks ({', '.join(shapes2.TASKS)})")
    return ShapesStream(cfg.max_steps * cfg.batch_size, cfg.seed, cfg.mask_codec, tasks=cfg.tasks)


def bench(examples: int, workers: tuple[int, ...], mask_codec: str | Path | None, batch: int = 32) -> dict:
    """Examples made per second by `workers` processes (each count in the same run): the collator's
    work too (tokens, pixels at the v2 model's 224 px), so it is what a training step waits for."""
    import time

    from palikit.assets import DEMO_MODEL_DIR
    from palikit.preprocess import ImageProcessor
    from palikit.tokenizer import Tokenizer
    from palikit.train.batches import StepPlan, step_batches
    from palikit.train.collate import Collator

    from .build import SPECS

    spec = SPECS[2]
    tokenizer = Tokenizer.from_file(DEMO_MODEL_DIR / "tokenizer.json")  # v1 pieces: the cost is the same
    collator = Collator(tokenizer, ImageProcessor(size=spec.config.vision.image_size), spec.config)
    steps = max(examples // batch, 1)
    plan = StepPlan(ShapesStream(steps * batch, seed=99, mask_codec=mask_codec), batch, batch, seed=0)
    collator([plan.train_set[0]])  # fonts found, codec loaded: first-use costs out of the timing
    out = {"examples": steps * batch, "batch": batch}
    for w in workers:
        t = time.perf_counter()
        for _ in step_batches(plan, collator, 0, steps, workers=w):
            pass
        out[f"examples_per_s_workers_{w}"] = round(steps * batch / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    import argparse
    import json
    import os

    ap = argparse.ArgumentParser(description="How fast shapes v2 examples are made on the fly (one JSON line).")
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--workers", default="0,2", help="comma-separated worker counts, each measured")
    ap.add_argument("--mask-codec", default=None, help="vae-oid.npz (segment rows); default: the bundled one")
    args = ap.parse_args()
    from palikit.assets import DEMO_MODEL_DIR

    codec = args.mask_codec or DEMO_MODEL_DIR / "vae-oid.npz"
    res = bench(args.examples, tuple(int(w) for w in args.workers.split(",")), codec)
    print(json.dumps({"machine": f"{os.cpu_count()} CPU cores", **res}))


if __name__ == "__main__":
    main()
