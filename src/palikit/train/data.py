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
annotation id, message). `strict=True` raises a `DataError` listing the first few and the count;
`strict=False` skips those examples and returns the problems on `Dataset.problems`.

The reading half (`read_jsonl_rows`, `read_coco`, `check_annotations`) is shared with
`palikit.eval`: a broken line or an unknown category reads the same in `palikit train` and
`palikit eval` (same line numbers, same messages, same strict / skip rule).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..tasks.boxes import encode_box
from ..tasks.rle import segmentation_to_mask as decode_segmentation  # COCO polygons / RLE -> bool mask

log = logging.getLogger(__name__)

MAX_LISTED = 10


@dataclass(frozen=True)
class Example:
    image: str  # absolute path
    prefix: str
    suffix: str
    source: str = ""  # "file:line" (or "file:image_id=..") for error messages
    task: str = ""  # JSONL: the row's optional "task" field (e.g. "ocr"); COCO: detect / segment. For TrainConfig.tasks


@dataclass(frozen=True)
class Problem:
    file: str
    where: str  # "line 12" / "annotation id=7"
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.where}: {self.message}"


class DataError(ValueError):
    """Bad training data. `.problems` holds every problem found (not only the listed ones)."""

    def __init__(self, problems: Sequence[Problem], what: str = "training data",
                 hint: str = "pass strict_data=false to skip these examples (they are still reported)"):
        self.problems = list(problems)
        lines = [f"{len(self.problems)} problem(s) in {what}:"]
        lines += [f"  {p}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        lines.append(f"Fix them, or {hint}.")
        super().__init__("\n".join(lines))


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
def read_jsonl_rows(path: str | Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Every non-blank line of a JSONL file as (1-based line number, JSON object). Lines that are not
    a JSON object become `Problem`s with their real line number. A missing file raises `DataError`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError([Problem(str(path), "-", "file not found")], str(path)) from None
    except UnicodeDecodeError as e:
        raise DataError([Problem(str(path), f"byte {e.start}", "not UTF-8 text")], str(path)) from None
    rows: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), f"line {n}", f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(str(path), f"line {n}", f"expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append((n, row))
    return rows, problems


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
        if not image.is_file():
            bad(f"image file not found: {image}")
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


def read_coco(path: str | Path) -> dict:
    """A COCO json file as a dict with `images`, `annotations` and `categories`; a missing file, bad
    JSON (with its line) or a missing section raises `DataError`."""
    path = Path(path)
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError([Problem(str(path), "-", "file not found")], str(path)) from None
    except json.JSONDecodeError as e:
        raise DataError([Problem(str(path), f"line {e.lineno}", f"invalid JSON ({e.msg})")], str(path)) from None
    missing = [k for k in ("images", "annotations", "categories") if k not in coco] if isinstance(coco, dict) \
        else ["images", "annotations", "categories"]
    if missing:
        raise DataError([Problem(str(path), "-", f"not a COCO file: missing {', '.join(missing)}")], str(path))
    return coco


def check_annotations(coco: dict, path: str | Path, *, box_tolerance: float = 1.0, need_segmentation: bool = False
                      ) -> tuple[dict, dict[int, list[dict]], list[Problem]]:
    """Validate a COCO dict: images need id, file_name, width, height; annotations a known image_id,
    a known category_id, a positive [x, y, w, h] box inside the image (+- `box_tolerance` px) and,
    with `need_segmentation`, a segmentation. Returns ({image_id: (file_name, W, H)},
    {image_id: [valid annotations]}, problems)."""
    path = str(path)
    cats = {c["id"] for c in coco["categories"]}
    problems: list[Problem] = []
    images = {}
    for im in coco["images"]:
        try:
            images[im["id"]] = (im["file_name"], float(im["width"]), float(im["height"]))
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(path, f"image id={im.get('id')}", "image entry needs id, file_name, width, height"))
    by_image: dict[int, list[dict]] = {i: [] for i in images}
    for k, ann in enumerate(coco["annotations"]):
        where = f"annotation id={ann.get('id', f'#{k}')}"
        img = images.get(ann.get("image_id"))
        if img is None:
            problems.append(Problem(path, where, f"unknown image_id {ann.get('image_id')!r}"))
            continue
        if ann.get("category_id") not in cats:
            problems.append(Problem(path, where, f"unknown category_id {ann.get('category_id')!r} "
                                                 f"(categories: {', '.join(map(str, sorted(cats, key=str)))})"))
            continue
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            problems.append(Problem(path, where, "bbox must be [x, y, width, height]"))
            continue
        _, W, H = img
        if w <= 0 or h <= 0:
            problems.append(Problem(path, where, f"zero-area box {ann['bbox']}"))
            continue
        if x < -box_tolerance or y < -box_tolerance or x + w > W + box_tolerance or y + h > H + box_tolerance:
            problems.append(Problem(path, where, f"box {ann['bbox']} lies outside the {W:g}x{H:g} image"))
            continue
        if need_segmentation and not ann.get("segmentation"):
            problems.append(Problem(path, where, "no segmentation for a segment target"))
            continue
        by_image[ann["image_id"]].append(ann)
    return images, by_image, problems


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

    cats = {c["id"]: str(c["name"]) for c in coco["categories"]}
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
        if not image.is_file():
            problems.append(Problem(str(path), f"image id={image_id}", f"image file not found: {image}"))
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
