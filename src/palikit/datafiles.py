"""The data-file readers training and evaluation share: big_vision / Roboflow JSONL rows and COCO
annotation files, read and checked the same way for `palikit train` and `palikit eval` (the real line
number or annotation id, the same message). A problem is never dropped silently: each becomes a
`Problem`; `DataError` lists them (the callers choose strict or skip-and-report). What a row MEANS
(a training example, an evaluation sample) is `train/data.py`'s and `eval/datasets.py`'s business.

The checks every caller gets: JSON that is nested too deeply is a problem on its line, not a
`RecursionError`; COCO category names obey the label rule the server applies to labels
(`tasks.labels.label_problem`: no ';', newline, '<' or '>', not blank), so `detect tri\nangle` is never
built from data; `image_problem` reads an image's header (format, size) without decoding it. This module
sits above `tasks` (it applies the task layer's label rule to files) and below eval / train.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .tasks.labels import label_problem

MAX_LISTED = 10  # problems listed in a message (all are kept on DataError.problems)
TOO_DEEP = "JSON nested too deeply (Python's recursion limit); flatten the value"


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


def read_jsonl_rows(path: str | Path) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """Every non-blank line of a JSONL file as (1-based line number, JSON object). Lines that are not
    a JSON object become `Problem`s with their real line number. A missing file raises `DataError`."""
    path = Path(path)
    text = _read_text(path)
    rows: list[tuple[int, dict]] = []
    problems: list[Problem] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem(str(path), f"line {n}", f"invalid JSON: {_at(e.msg)} column {e.colno}"))
            continue
        except RecursionError:  # '[[[[...' thousands deep: a problem on its line, never a traceback
            problems.append(Problem(str(path), f"line {n}", TOO_DEEP))
            continue
        if not isinstance(row, dict):
            problems.append(Problem(str(path), f"line {n}", f"expected a JSON object, got {type(row).__name__}"))
            continue
        rows.append((n, row))
    return rows, problems


def read_coco(path: str | Path) -> dict:
    """A COCO json file as a dict with `images`, `annotations` and `categories`; a missing file, bad
    JSON (with its line) or a missing section raises `DataError`."""
    path = Path(path)
    text = _read_text(path)
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(path, text, e) from None
    except RecursionError:
        raise DataError([Problem(str(path), "-", TOO_DEEP)], str(path)) from None
    missing = [k for k in ("images", "annotations", "categories") if k not in coco] if isinstance(coco, dict) \
        else ["images", "annotations", "categories"]
    if missing:
        raise DataError([Problem(str(path), "-", f"not a COCO file: missing {', '.join(missing)}")], str(path),
                        hint="give a COCO instances file (images, annotations, categories) or a .jsonl of rows")
    return coco


def _read_text(path: Path) -> str:
    """The whole file as text; a missing file or one that is not UTF-8 is a `DataError` (file-level:
    skipping rows cannot help, so the hint says what to do with the file)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError([Problem(str(path), "-", "file not found")], str(path),
                        hint="check the path (a relative path starts from the current folder)") from None
    except UnicodeDecodeError as e:
        raise DataError([Problem(str(path), f"byte {e.start}", "not UTF-8 text")], str(path),
                        hint="save it as UTF-8 text") from None


def _at(msg: str) -> str:
    """json's message followed by 'at' once ("Expecting value at", "Unterminated string starting at")."""
    return msg if msg.endswith(" at") else msg + " at"


def _json_error(path: Path, text: str, e: json.JSONDecodeError) -> DataError:
    """A JSON document that does not parse, with its line and column (and character offset); a
    document cut off before its end (an interrupted download or copy) is said to be so."""
    cut = e.msg.startswith("Unterminated string") or e.pos >= len(text.rstrip())
    where = f"line {e.lineno}, column {e.colno}"
    msg = (f"invalid JSON: {_at(e.msg)} {where} (character {e.pos} of "
           f"{len(text)})" + ("; the file ends before the JSON does: it looks truncated" if cut else ""))
    hint = ("copy or download the whole file again" if cut else "fix the JSON at that place") + \
        " (skipping rows cannot help: the file does not parse)"
    return DataError([Problem(str(path), where, msg)], str(path), hint=hint)


def as_text(value, what: str) -> str:
    """A label or reference answer read from a data file, as text: a string as is, a number as its text
    (`5` -> "5", `2.5` -> "2.5"). Anything else (a boolean, null, a list, an object) raises ValueError
    saying what was there and what to write instead."""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, bool):
        fix = f'a boolean: write the answer as text, e.g. "{"yes" if value else "no"}"'
    else:
        fix = 'give a string or a number, e.g. "square" or 5'
    raise ValueError(f"{what} is {json.dumps(value)[:60]}: {fix}")


def as_texts(value, what: str) -> list[str]:
    """One or several reference answers: a string or a number is ONE answer (`"square"` -> ["square"],
    never its letters), a list holds several (each a string or a number). Anything else raises ValueError."""
    if isinstance(value, list):
        return [as_text(v, f"{what}[{i}]") for i, v in enumerate(value)]
    return [as_text(value, what)]


def check_annotations(coco: dict, path: str | Path, *, box_tolerance: float = 1.0, need_segmentation: bool = False
                      ) -> tuple[dict, dict[int, list[dict]], list[Problem]]:
    """Validate a COCO dict: images need id, file_name, width, height; annotations a known image_id,
    a known category_id, a positive [x, y, w, h] box inside the image (+- `box_tolerance` px) and,
    with `need_segmentation`, a segmentation. Returns ({image_id: (file_name, W, H)},
    {image_id: [valid annotations]}, problems)."""
    path = str(path)
    cats, problems = category_names(coco, path)
    bad_cats = {c.get("id") for c in coco["categories"] if isinstance(c, dict)} - set(cats)
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
            if ann.get("category_id") in bad_cats:
                continue  # its category is reported once, with the number of annotations it drops
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


def category_names(coco: dict, path: str | Path) -> tuple[dict, list[Problem]]:
    """{category id: name as text} of the categories whose name can sit in a prompt (`as_text`: a
    category named 5 is "5"), and a `Problem` for each other one (a name that is neither text nor a
    number, the label rule `tasks.labels.label_problem`, a blank or missing name); the annotations of a
    refused category are counted in its problem, not listed one by one."""
    path = str(path)
    good, problems = {}, []
    for k, c in enumerate(coco["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), (int, str)):
            problems.append(Problem(path, f"category #{k}", 'a category needs an "id" (a number) and a "name"'))
            continue
        try:
            name = as_text(c.get("name"), 'its "name"')
        except ValueError as e:
            name, why = None, str(e)
        else:
            why = label_problem(name) or (None if name.strip() else "blank name")
        if why is None:
            good[c["id"]] = name
            continue
        n = sum(1 for a in coco["annotations"] if isinstance(a, dict) and a.get("category_id") == c["id"])
        problems.append(Problem(path, f"category id={c['id']}", f"{why} (a detect/segment prompt names it); rename "
                                                                 f"it: its {n} annotation(s) are left out"))
    return good, problems


def image_problem(path: str | Path) -> str | None:
    """What keeps the image file at `path` from being read (None: its header is fine): missing, not a
    format palikit opens, an unreadable or empty header, too many pixels. Reads the header only (no
    decode: cheap for a whole data set up front); truncated pixel data shows only when decoded."""
    from PIL import Image

    from .preprocess import DEFAULT_MAX_PIXELS, IMAGE_FORMATS

    path = Path(path)
    if not path.is_file():
        return f"image file not found: {path}"
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            w, h = im.size
    except Image.UnidentifiedImageError:
        return f"{path} is not an image palikit opens (PNG, JPEG, WebP, GIF, BMP, TIFF) or its header is corrupt"
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        return f"cannot read the image header of {path} ({type(e).__name__}: {e})"
    if w < 1 or h < 1:
        return f"{path} is an empty image ({w}x{h})"
    if w * h > DEFAULT_MAX_PIXELS:
        return f"{path} is {w}x{h} pixels, more than the {DEFAULT_MAX_PIXELS} palikit decodes; downscale it"
    return None
