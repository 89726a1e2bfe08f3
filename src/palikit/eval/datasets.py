"""Evaluation data: `Sample` / `EvalDataset` and the readers for JSONL and COCO json.

The file-level reading is shared with training (`palikit.datafiles`: `read_jsonl_rows`, `read_coco`,
`check_annotations`), so a broken line, an unknown category or a bad box reads the same in
`palikit train` and `palikit eval`: the real line number / annotation id, the same message. A bad row
raises `DataError` listing every problem (`strict=True`, the default) or is skipped and reported
(`strict=False`, `palikit eval --skip-bad-rows`). Image files are checked by `check_images` (file and
header, no decoding): with strict=False a missing or unreadable image is skipped and reported like a
bad row; otherwise it is a failed sample of the run (recorded and counted). When no image exists at
all, the data set points at the wrong folder: `check_images` raises, naming the folder that holds them
when one is near (`--images`: a classic COCO layout keeps annotations/ and images/ side by side).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..datafiles import DataError, Problem, as_texts, category_names, check_annotations, read_coco, read_jsonl_rows

log = logging.getLogger(__name__)

TASKS = ("ocr", "vqa", "anls", "caption", "count", "exact", "detect", "segment")  # built in; see the task table
SKIP_HINT = "pass --skip-bad-rows (strict=False) to evaluate the other rows (the skipped ones are still reported)"


def canonical_task(task: str) -> str:
    """The evaluable task of the task table (`tasks.registry`) called `task` or one of its aliases."""
    from ..tasks.registry import eval_task

    return eval_task(task).name


@dataclass
class Sample:
    """One evaluation item. `refs`: reference texts (answers, captions, OCR text); `labels`: class names
    asked for (detect / segment); `meta`: question, COCO image id, ground-truth mask / box, domain..."""

    id: str
    image: str
    prompt: str
    refs: list[str] = field(default_factory=list)
    labels: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvalDataset:
    samples: list[Sample]
    path: str = ""
    coco: dict[str, Any] | None = None  # COCO ground truth (detect / segment from COCO json)
    problems: list[Problem] = field(default_factory=list)  # rows skipped with strict=False
    images_checked: bool = False  # `check_images` ran (it runs once per data set)

    def __len__(self) -> int:
        return len(self.samples)


def _finish(samples: list[Sample], problems: list[Problem], strict: bool, path: Path, coco=None) -> EvalDataset:
    if problems and strict:
        raise DataError(problems, f"evaluation data {path}", hint=SKIP_HINT)
    if problems:
        log.warning("skipped %d bad row(s) of %s (kept %d samples); first: %s", len(problems), path, len(samples),
                    problems[0])
    return EvalDataset(samples, str(path), coco, list(problems))


def _load_mask(value: Any, root: Path) -> np.ndarray:
    if isinstance(value, Mapping):
        from ..tasks.rle import rle_to_mask

        return rle_to_mask(value)
    from PIL import Image

    return np.asarray(Image.open(root / str(value)).convert("L")) > 0


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return (0.0, 0.0, 0.0, 0.0)
    return (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))


def _refs(row: Mapping[str, Any]) -> list[str]:
    """The reference texts of a row: "answers" / "captions", else "suffix" / "answer" / "text" /
    "caption" (`datafiles.as_texts`: a string or a number is one reference, a list several). A wrong
    type raises ValueError."""
    if "answers" in row or "captions" in row:
        key = "answers" if "answers" in row else "captions"
        return as_texts(row[key], f'"{key}"')
    key = next((k for k in ("suffix", "answer", "text", "caption") if row.get(k) is not None), None)
    return [] if key is None else as_texts(row[key], f'"{key}"')


def load_jsonl(path: str | Path, task: str, *, image_root: str | Path | None = None,
               strict: bool = True) -> EvalDataset:
    """Rows: {"image", "prefix", "suffix"} | {"image", "question", "answers": [...] | "answer"} |
    {"image", "captions": [...]} | {"image", "text"} (OCR) | segment: {"image", "prefix" or "label",
    "mask": RLE dict or png path, optional "box": [x0, y0, x1, y1]}. Optional "id" / "question_id"
    (default: the 0-based line index) and "domain" (per-domain scores). Image and mask paths are
    relative to `image_root` (default: the file's folder)."""
    task = canonical_task(task)
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    from ..tasks.registry import eval_task

    spec = eval_task(task).eval
    needs_refs, masks = spec.needs_refs, spec.metric == "segment"  # referring segmentation: masks per row
    rows, problems = read_jsonl_rows(path)
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for n, row in rows:
        where = f"line {n}"
        if not isinstance(row.get("image"), str) or not row["image"]:
            problems.append(Problem(str(path), where, 'needs an "image" (a path string)'))
            continue
        try:
            refs = _refs(row)
        except ValueError as e:
            problems.append(Problem(str(path), where, str(e)))
            continue
        if needs_refs and not refs:
            problems.append(Problem(str(path), where, "no reference: give suffix, text, answer, answers or captions"))
            continue
        sid = str(row.get("id", row.get("question_id", n - 1)))
        if sid in seen:
            problems.append(Problem(str(path), where, f"id {sid!r} already used on line {seen[sid]}"))
            continue
        meta = {k: row[k] for k in ("question", "prefix", "answer_type", "domain") if k in row}
        labels = None
        if masks:
            try:
                mask = _load_mask(row["mask"], root)
            except (KeyError, OSError, ValueError, TypeError) as e:
                problems.append(Problem(str(path), where, f"cannot read the mask: {e!r}"))
                continue
            meta.update(gt_mask=mask, gt_box=tuple(row["box"]) if "box" in row else _mask_box(mask))
            try:
                labels = as_texts(row["label"], '"label"') if "label" in row else None
            except ValueError as e:
                problems.append(Problem(str(path), where, str(e)))
                continue
        seen[sid] = n
        meta["file"] = row["image"]
        samples.append(Sample(sid, str(root / row["image"]), str(row.get("prefix", "")), refs, labels, meta))
    problems.sort(key=lambda p: int(p.where[5:]) if p.where[5:].isdigit() else 0)
    return _finish(samples, problems, strict, path)


def load_coco(path: str | Path, task: str = "detect", *, image_root: str | Path | None = None,
              categories: str | Sequence[str] = "present", strict: bool = True, negatives: int = 0,
              seed: int = 0) -> EvalDataset:
    """COCO instances json -> one sample per image (`id` = str(image id)). `categories="present"`
    asks each image only for the categories it contains (images without annotations are skipped): it
    measures localisation, not hallucination of absent classes; `negatives=N` also asks each image for
    N categories it does not contain (drawn per image from `seed`; images without annotations are kept
    then, asked for N absent ones), so boxes given for absent classes count as false positives in the
    mAP and in the false-positive rate (`metrics_tasks.negatives_fp`). `"all"` (or a list of names)
    asks every image for every category: closer to standard COCO mAP, but long prompts (80 classes).
    The labels asked for are in category order; `meta["negatives"]` holds the absent ones. Detections
    are mapped back to categories by name (singular / plural spellings accepted). Image paths are
    relative to `image_root` (default: the json's folder; `palikit eval --images DIR`)."""
    if not isinstance(negatives, int) or isinstance(negatives, bool) or negatives < 0:
        raise ValueError(f"negatives must be a whole number >= 0, got {negatives!r}")
    from ..tasks.registry import eval_task

    masks = eval_task(task).eval.metric == "segment"  # instance masks are scored: annotations need them
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    coco = read_coco(path)
    names, problems = category_names(coco, path)  # a category named 5 is "5"; bad names are problems
    coco = {**coco, "categories": [{**c, "name": names[c["id"]]} for c in coco["categories"]
                                   if isinstance(c, Mapping) and c.get("id") in names]}
    images, by_image, more = check_annotations(coco, path, need_segmentation=masks)
    problems += more
    if problems and strict:
        raise DataError(problems, f"evaluation data {path}", hint=SKIP_HINT)
    # the ground truth the metrics see: only the annotations that passed the checks
    coco = {**coco, "images": [im for im in coco["images"] if im.get("id") in images],
            "annotations": [a for anns in by_image.values() for a in anns]}
    order = list(names)
    samples = []
    for img in coco["images"]:
        present = {a["category_id"] for a in by_image[img["id"]]}
        if categories == "present":
            absent = [c for c in order if c not in present]
            asked = present | set(random.Random(f"{seed}:{img['id']}").sample(absent, min(negatives, len(absent))))
            labels = [names[c] for c in order if c in asked]
            if not labels:
                continue  # nothing to ask for: COCOeval ignores images without GT of a category anyway
        elif categories == "all":
            labels = list(names.values())
        else:
            labels = list(categories)
        negs = [lab for lab in labels if lab not in {names[c] for c in present}]
        samples.append(Sample(str(img["id"]), str(root / img["file_name"]), "", [], labels,
                              {"image_id": img["id"], "width": img.get("width"), "height": img.get("height"),
                               "file": img["file_name"], "negatives": negs}))
    return _finish(samples, problems, False, path, coco)


def load_dataset(dataset: str | Path | EvalDataset | Sequence[Sample], task: str, *,
                 image_root: str | Path | None = None, strict: bool = True, negatives: int = 0) -> EvalDataset:
    """A path (.json -> `load_coco`, else `load_jsonl`), an `EvalDataset` or a list of `Sample`s.
    `negatives` (COCO detect / segment only): absent classes asked per image (`load_coco`)."""
    if isinstance(dataset, EvalDataset):
        return dataset
    if isinstance(dataset, (str, Path)):
        p = Path(dataset)
        if p.suffix == ".json":
            return load_coco(p, task, image_root=image_root, strict=strict, negatives=negatives)
        if negatives:
            raise ValueError("--negatives (absent classes asked per image) needs a COCO .json data set with "
                             "categories; a .jsonl has no list of classes to draw from")
        return load_jsonl(p, task, image_root=image_root, strict=strict)
    return EvalDataset(list(dataset))


# ------------------------------------------------------------------------------ image files
def image_problem(image: Any) -> str | None:
    """What keeps `image` (a path) from being read: not found, or not an image (the header is read, the
    pixels are not); None when it reads, or when it is not a path (an image object)."""
    if not isinstance(image, (str, Path)):
        return None
    if not Path(image).is_file():
        return f"image file not found: {image}"
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(image) as im:
            im.size  # noqa: B018 - the header is parsed on open; size proves it
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return f"not a readable image: {image} ({type(e).__name__}: {e})"
    return None


def locate_images(ds: EvalDataset, tries: int = 5) -> Path | None:
    """A folder near the data file under which the missing images' relative paths exist (the first
    `tries` missing samples must all be found there): the data file's own sub-folders, its parent's
    (a classic COCO layout: annotations/ beside images/ or val2017/) and their sub-folders."""
    missing = [s for s in ds.samples if isinstance(s.meta.get("file"), str) and not Path(s.image).is_file()][:tries]
    if not missing or not ds.path:
        return None
    here = Path(ds.path).resolve().parent
    candidates: list[Path] = []
    for base in (here, here.parent):
        subs = sorted(p for p in base.iterdir() if p.is_dir())[:200] if base.is_dir() else []
        candidates += [base, *subs, *(q for p in subs for q in sorted(p.iterdir())[:50] if q.is_dir())]
    for folder in dict.fromkeys(candidates):
        if all((folder / s.meta["file"]).is_file() for s in missing):
            return folder
    return None


def images_hint(ds: EvalDataset) -> str:
    """What to pass when images are missing: `--images DIR` with the folder that holds them, if found."""
    found = locate_images(ds)
    if found is not None:
        return f"pass --images {found} (image_root= in Python): the images are there"
    return ("pass --images DIR (image_root= in Python), the folder the image paths of the data file are relative "
            "to (default: the data file's folder)")


def check_images(ds: EvalDataset, *, strict: bool = True) -> EvalDataset:
    """Check every sample's image file (exists, header reads) once. No image readable at all raises
    `DataError` with `images_hint`. strict=False (`--skip-bad-rows`): samples with a missing or unreadable
    image are dropped and reported in `problems`; strict=True keeps them (each becomes a failed sample)."""
    if ds.images_checked or not ds.samples:
        return ds
    bad = {s.id: p for s in ds.samples if (p := image_problem(s.image)) is not None}
    ds.images_checked = True
    if bad and len(bad) == len(ds.samples):
        first = ds.samples[0]
        raise DataError([Problem(ds.path, f"sample {first.id}", bad[first.id])],
                        f"evaluation data {ds.path} (none of its {len(ds.samples)} images can be read)",
                        hint=images_hint(ds))
    if bad and not strict:
        ds.problems += [Problem(ds.path, f"sample {sid}", why) for sid, why in bad.items()]
        ds.samples = [s for s in ds.samples if s.id not in bad]
        log.warning("skipped %d sample(s) of %s whose image cannot be read (kept %d); first: %s", len(bad), ds.path,
                    len(ds.samples), next(iter(bad.values())))
    return ds
