"""Training examples from files: big_vision / Roboflow JSONL and COCO detection / instance
segmentation annotations, converted to PaliGemma prefix -> suffix pairs.

JSONL: one `{"image": path, "prefix": str, "suffix": str}` per line; relative image paths resolve
against the JSONL file's folder.

COCO -> PaliGemma targets (one example per image):
- detect: prefix `detect a ; b` (the image's classes in category-id order; with
  `include_absent=True` every category, so absent ones teach an empty answer), suffix
  `<locY0><locX0><locY1><locX1> a ; <loc...> b` (instances grouped by class in prefix order, then
  in annotation order). A coordinate v on an image side of `size` pixels becomes
  `round(v / size * 1024)` clipped to 0..1023 (`palikit.tasks.boxes.encode_box`) -- the inverse of
  the `v / 1024 * size` decode the official demo and palikit's parser use (big_vision's RefCOCO code
  uses 1023; the two differ by < 0.1% of the side).
- segment: prefix `segment a ; b`, suffix per instance `<loc>x4 <seg>x16 a`, the 16 `<seg>` codes
  from the VQ-VAE mask codec (`palikit.tasks.mask_codec.tokens_from_mask`). Segmentations are decoded
  by `palikit.tasks.rle.segmentation_to_mask` (RLE in NumPy, polygons by pycocotools when installed,
  else PIL).

Problems are never dropped silently: every bad line / annotation becomes a `Problem` (file, line or
annotation id, message): a missing image or one whose header cannot be read (`datafiles.image_problem`,
no decode), a prefix with a newline inside, a COCO category name a prompt cannot hold. `strict=True`
raises a `DataError` listing the first few and the count; `strict=False` skips those examples and
returns the problems on `Dataset.problems`.

The reading half (`read_jsonl_rows`, `read_coco`, `check_annotations`, `Problem`, `DataError`) is
`palikit.datafiles`, shared with `palikit.eval`: a broken line or an unknown category reads the same in
`palikit train` and `palikit eval` (same line numbers, same messages, same strict / skip rule).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..datafiles import (MAX_LISTED, DataError, Problem, category_names, check_annotations, image_problem, read_coco,
                         read_jsonl_rows)
from ..tasks.boxes import encode_box
from ..tasks.rle import segmentation_to_mask as decode_segmentation  # COCO polygons / RLE -> bool mask

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Example:
    image: str  # absolute path
    prefix: str
    suffix: str
    source: str = ""  # "file:line" (or "file:image_id=..") for error messages
    task: str = ""  # JSONL: the row's optional "task" field (e.g. "ocr"); COCO: detect / segment. For TrainConfig.tasks


@dataclass
class Dataset:
    examples: list[Example]
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


def _finish(examples: list[Example], problems: list[Problem], strict: bool, what: str) -> Dataset:
    if problems and strict:
        raise DataError(problems, what)
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:MAX_LISTED])
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        log.warning("skipped %d problem(s) in %s (kept %d examples):\n%s%s", len(problems), what, len(examples), listed, more)
    return Dataset(examples, problems)


# ------------------------------------------------------------------------------------ JSONL
def load_jsonl(path: str | Path, *, strict: bool = True, image_root: str | Path | None = None) -> Dataset:
    """Read a big_vision / Roboflow PaliGemma JSONL file."""
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    examples: list[Example] = []
    rows, problems = read_jsonl_rows(path)
    for n, row in rows:
        where = f"line {n}"

        def bad(msg):
            problems.append(Problem(str(path), where, msg))

        missing = [k for k in ("image", "prefix", "suffix") if k not in row]
        if missing:
            bad(f"missing key(s) {', '.join(missing)} (need image, prefix, suffix)")
            continue
        wrong = [k for k in ("image", "prefix", "suffix") if not isinstance(row[k], str)]
        if wrong:
            bad(f"key(s) {', '.join(wrong)} must be strings")
            continue
        image = Path(row["image"])
        image = image if image.is_absolute() else root / image
        if (why := image_problem(image)) is not None:
            bad(why)
            continue
        if "\n" in row["prefix"].removesuffix("\n") or "\r" in row["prefix"]:
            bad("the prefix contains a newline: '\\n' ends the PaliGemma prompt (the suffix starts after it)")
            continue
        task = row.get("task", "")
        if not isinstance(task, str):
            bad("key task must be a string")
            continue
        examples.append(Example(str(image), row["prefix"], row["suffix"], f"{path}:{n}", task))
    problems.sort(key=_line_of)
    return _finish(examples, problems, strict, str(path))


def _line_of(p: Problem) -> int:
    return int(p.where[5:]) if p.where.startswith("line ") and p.where[5:].isdigit() else 0


# ------------------------------------------------------------------------------------ COCO
def box_tokens(box_xyxy: Sequence[float], width: float, height: float) -> str:
    """`<locY0><locX0><locY1><locX1>` of a pixel box (`tasks.boxes.encode_box`: round(v / side * 1024)
    clipped to 0..1023)."""
    return encode_box(box_xyxy, (width, height))


MaskTokenizer = Callable[["object", tuple[float, float, float, float]], list[int]]


def codec_mask_tokenizer(codec_path: str | Path) -> MaskTokenizer:
    """`(mask_bool_HxW, box_xyxy) -> 16 codes` from the VQ-VAE codec file (vae-oid.npz)."""
    from palikit.tasks.mask_codec import MaskCodec, tokens_from_mask

    codec = MaskCodec.from_npz(codec_path)
    return lambda mask, box: list(tokens_from_mask(codec, mask, box))


def load_coco(
    path: str | Path,
    *,
    task: str = "detect",
    image_root: str | Path | None = None,
    include_absent: bool = False,
    strict: bool = True,
    mask_tokenizer: MaskTokenizer | None = None,
    mask_codec: str | Path | None = None,
    box_tolerance: float = 1.0,
) -> Dataset:
    """COCO detection (`task="detect"`) or instance segmentation (`task="segment"`) annotations ->
    one PaliGemma example per annotated image (with `include_absent`, per image)."""
    if task not in ("detect", "segment"):
        raise ValueError(f"task must be 'detect' or 'segment', got {task!r}")
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    coco = read_coco(path)
    if task == "segment" and mask_tokenizer is None:
        if mask_codec is None:
            raise ValueError("COCO segmentation targets need the mask codec: set mask_codec (vae-oid.npz)")
        mask_tokenizer = codec_mask_tokenizer(mask_codec)

    cats = {k: str(v) for k, v in category_names(coco, path)[0].items()}  # the label rule's refusals: problems
    cat_order = sorted(cats)
    images, by_image, problems = check_annotations(coco, path, box_tolerance=box_tolerance,
                                                   need_segmentation=task == "segment")
    bad_images = set()
    examples: list[Example] = []
    for image_id, anns in by_image.items():
        file_name, W, H = images[image_id]
        image = Path(file_name)
        image = image if image.is_absolute() else root / image
        if not anns and not include_absent:
            continue
        if (why := image_problem(image)) is not None:
            problems.append(Problem(str(path), f"image id={image_id}", why))
            continue
        present = sorted({a["category_id"] for a in anns})
        listed = cat_order if include_absent else present
        parts = []
        try:
            for cid in present:
                for a in anns:
                    if a["category_id"] != cid:
                        continue
                    x, y, w, h = (float(v) for v in a["bbox"])
                    box = (x, y, x + w, y + h)
                    locs = box_tokens(box, W, H)
                    if task == "segment":
                        mask = decode_segmentation(a["segmentation"], int(H), int(W))
                        codes = mask_tokenizer(mask, box)
                        if len(codes) != 16 or not all(0 <= int(c) <= 127 for c in codes):
                            raise ValueError(f"mask tokenizer gave {codes!r}, expected 16 codes in 0..127")
                        locs += "".join(f"<seg{int(c):03d}>" for c in codes)
                    parts.append(f"{locs} {cats[cid]}")
        except ImportError:
            raise
        except Exception as e:  # a broken segmentation: report it against the image
            problems.append(Problem(str(path), f"image id={image_id}", f"cannot build target: {e}"))
            bad_images.add(image_id)
            continue
        prefix = f"{task} " + " ; ".join(cats[c] for c in listed)
        examples.append(Example(str(image), prefix, " ; ".join(parts), f"{path}:image_id={image_id}", task))
    return _finish(examples, problems, strict, str(path))


def select_tasks(examples: Sequence[Example], tasks: Sequence[str] | None, what: str) -> list[Example]:
    """Keep the examples whose `task` is listed (all of them when `tasks` is empty/None). Rows without a
    task field cannot be selected, so a filter over data that has none is an error, not an empty set."""
    if not tasks:
        return list(examples)
    wanted = set(tasks)
    kept = [ex for ex in examples if ex.task in wanted]
    if not kept:
        found = ", ".join(sorted({ex.task for ex in examples if ex.task})) or 'none (rows need a "task" field)'
        raise DataError([Problem(what, "-", f"no example has a task in {sorted(wanted)}; tasks found: {found}")], what)
    return kept


def load_examples(
    path: str | Path,
    *,
    data_format: str = "auto",
    strict: bool = True,
    coco_task: str = "detect",
    coco_images: str | Path | None = None,
    include_absent: bool = False,
    mask_codec: str | Path | None = None,
) -> Dataset:
    """Dispatch on `data_format` (auto: `.jsonl` -> JSONL, `.json` -> COCO)."""
    path = Path(path)
    fmt = data_format
    if fmt == "auto":
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "coco" if path.suffix.lower() == ".json" else ""
        if not fmt:
            raise ValueError(f"{path}: cannot tell the data format from the extension; set data_format=jsonl or coco")
    if fmt == "jsonl":
        return load_jsonl(path, strict=strict, image_root=coco_images)
    return load_coco(path, task=coco_task, image_root=coco_images, include_absent=include_absent,
                     strict=strict, mask_codec=mask_codec)


def holdout(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example], int, int]:
    """(train, validation, validation images, images) with `fraction` of the distinct images (at least
    one, seeded) held out: every example of a held-out image goes to validation, so no image is in both
    (several tasks per image would otherwise leak answers into the validation score)."""
    import random

    images = sorted({ex.image for ex in examples})
    if len(images) < 2:
        raise ValueError(f"val_fraction={fraction:g} needs at least 2 distinct images; the data has {len(images)}")
    n_val = min(max(1, round(fraction * len(images))), len(images) - 1)
    held = set(random.Random(seed).sample(images, n_val))
    return ([ex for ex in examples if ex.image not in held], [ex for ex in examples if ex.image in held],
            n_val, len(images))
