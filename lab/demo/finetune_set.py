"""A small fine-tuning set for the demo model (issue 19's "base worth fine-tuning"): shapes v2 images
holding only classes the bundled model never saw (`shapes2.EXTRA_CLASSES`: ring, diamond) at free
positions, sizes and aspect ratios, written as the base data is (`splits.write_split`: PNGs,
`{split}.jsonl`, `{split}_coco.json`) in three splits: train, validation (the recipe's val_data: val
loss, detect mAP at every eval, the best checkpoint, early stopping) and test (scored by `palikit eval`).

    python -m lab.demo.finetune_set --out work/newshapes          # 300 / 50 / 100 images
    palikit check work/newshapes/train_coco.json                  # what the bundled model can learn from it
    palikit train lab/recipes/demo-v2-finetune.yaml
    palikit eval work/newshapes/test_coco.json --task detect --model work/newshapes/run/final

The bundled model (v1: 112 px, boxes only on its 4x4 grid, a tokenizer without these words) is not a
base that learns free positions in a short run: the pre-flight says so and the lab README gives the
figures. The v2 model, when it ships, is the base this set was made for.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from palikit.demo import shapes2
from palikit.demo.shapes2 import EXTRA_CLASSES

from palikit.demo.splits import write_split


def write_finetune_set(out: str | Path, n_train: int = 300, n_test: int = 100,
                       classes: tuple[str, ...] = EXTRA_CLASSES, n_val: int = 50) -> dict:
    """Train, validation and test splits of images drawn with `classes` only (each split has its own
    seed, so no image is in two). Returns a summary: folder, images and instances per split."""
    out = Path(out)
    summary: dict = {"folder": str(out), "classes": list(classes)}
    for split, n in (("train", n_train), ("validation", n_val), ("test", n_test)):
        if not n:
            continue
        write_split(shapes2, out, split, n, None, classes=classes)
        coco = json.loads((out / f"{split}_coco.json").read_text())
        summary[split] = {"images": len(coco["images"]), "instances": len(coco["annotations"])}
    return summary


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a fine-tuning set of shapes the demo model never saw.")
    ap.add_argument("--out", default="work/newshapes", help="folder (default: %(default)s)")
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--val", type=int, default=50, help="validation images (0: none)")
    ap.add_argument("--test", type=int, default=100)
    ap.add_argument("--classes", default=",".join(EXTRA_CLASSES),
                    help="comma-separated shapes2 classes (default: %(default)s)")
    a = ap.parse_args(argv)
    classes = tuple(c.strip() for c in a.classes.split(",") if c.strip())
    from palikit.demo.shapes2 import ALL_CLASSES

    bad = [c for c in classes if c not in ALL_CLASSES]
    if bad or not classes:
        raise SystemExit(f"error: unknown classes {bad}; choose from {', '.join(ALL_CLASSES)}")
    print(json.dumps(write_finetune_set(a.out, a.train, a.test, classes, a.val), indent=2))


if __name__ == "__main__":
    main()
