"""A labelled data set on disk from either shapes generator (`shapes`, v1, or `shapes2`, v2): a split's
images as PNG, `{split}.jsonl` rows (image, prefix, suffix, task; v2's referring rows add "box", and
"label" + "mask" as RLE for segment) and `{split}_coco.json` (detection + instance segmentation ground
truth, RLE masks, each image's own width and height), and the `seg_fn` that gives segment rows their
`<seg>` codes from a mask codec. What the README's newcomer loop fine-tunes on and the checkout's
demo-model factory (`lab.demo.build`) builds from."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import ModuleType

from ..fileio import atomic_write_bytes, atomic_write_json
from ..tasks.rle import mask_to_rle
from .shapes import Shape


def codec_seg_fn(codec, on_encode=None):
    """The `seg_fn` of `examples` / `write_split` (both generators): a shape's 16 `<seg>` codes from
    the mask codec, encoded once per shape (several rows segment one shape); `on_encode()` runs after
    each encoding (a progress bar)."""
    from ..tasks.mask_codec import tokens_from_mask

    def seg_fn(shape: Shape) -> list[int]:
        codes = shape.__dict__.get("_codes")
        if codes is None:
            codes = shape.__dict__["_codes"] = tokens_from_mask(codec, shape.mask, shape.box)
            if on_encode is not None:
                on_encode()
        return codes

    return seg_fn


def write_split(generator: ModuleType, folder: str | Path, split: str, n: int, size=None, seg_fn=None,
                classes: tuple[str, ...] | None = None) -> Path:
    """The first `n` images of `split` drawn by `generator` at `size` (None: the generator's default, v1's
    112 px, v2's own size per image), their task rows (`generator.examples`, with `seg_fn` the segment
    rows too) and COCO ground truth over `classes` (default: the generator's own; v2 only takes others),
    written atomically under `folder`."""
    options = {} if classes is None else {"classes": classes}
    sized = {} if size is None else {"size": size}
    classes = classes or generator.CLASSES
    folder = Path(folder)
    (folder / split).mkdir(parents=True, exist_ok=True)
    rng = random.Random(generator.SPLIT_SEEDS[split] + 7)
    lines, images, annotations = [], [], []
    for sample in generator.iter_split(split, n, **sized, **options):
        rel = f"{split}/{sample.index:06d}.png"
        sample.image.save(folder / rel)
        lines += [json.dumps({"image": rel, **ex}) for ex in generator.examples(sample, rng, seg_fn, **options)]
        w, h = sample.image.size
        images.append({"id": sample.index, "file_name": rel, "width": w, "height": h})
        for s in sample.shapes:
            x0, y0, x1, y1 = s.box
            annotations.append({
                "id": len(annotations) + 1, "image_id": sample.index, "category_id": classes.index(s.cls) + 1,
                "bbox": [x0, y0, x1 - x0, y1 - y0], "area": float(s.mask.sum()), "iscrowd": 0,
                "segmentation": mask_to_rle(s.mask),
            })
    atomic_write_bytes(folder / f"{split}.jsonl", "\n".join(lines) + "\n")
    categories = [{"id": i + 1, "name": c} for i, c in enumerate(classes)]
    atomic_write_json(folder / f"{split}_coco.json", {"images": images, "annotations": annotations,
                                                      "categories": categories})
    return folder
