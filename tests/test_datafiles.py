"""The shared data readers (`palikit.datafiles`) as training and evaluation see them: bad data is a
`DataError` naming the file and line / id, never a traceback and never a prompt built from it."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from palikit.datafiles import DataError, image_problem
from palikit.eval.datasets import load_coco as eval_coco
from palikit.eval.datasets import load_jsonl as eval_jsonl
from palikit.train.data import load_coco as train_coco
from palikit.train.data import load_jsonl as train_jsonl

DEEP = "[" * 100_000 + "]" * 100_000  # valid JSON, far past Python's recursion limit


def _image(path, size=(32, 24)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path)
    return path


def _coco(tmp_path, names):
    _image(tmp_path / "a.png")
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 24}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": i + 1, "bbox": [2, 2, 10, 10]}
                            for i in range(len(names))],
            "categories": [{"id": i + 1, "name": n} for i, n in enumerate(names)]}
    p = tmp_path / "coco.json"
    p.write_text(json.dumps(coco))
    return p


def test_deeply_nested_json_line_is_a_problem_not_a_recursion_error(tmp_path):
    """issue 38 T6: a deeply nested JSON line in train or eval data (RecursionError traceback on main)."""
    _image(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "prefix": "ocr", "suffix": "AB"})
    p = tmp_path / "d.jsonl"
    p.write_text(good + "\n" + DEEP + "\n")
    for load in (lambda: train_jsonl(p), lambda: eval_jsonl(p, "ocr")):
        with pytest.raises(DataError, match=r"d\.jsonl:line 2: JSON nested too deeply"):
            load()
    assert len(train_jsonl(p, strict=False)) == 1  # skipped and reported, the good row kept
    c = tmp_path / "deep.json"
    c.write_text('{"images": ' + DEEP + "}")
    for load in (lambda: train_coco(c), lambda: eval_coco(c, "detect")):
        with pytest.raises(DataError, match="nested too deeply"):
            load()


@pytest.mark.parametrize("name", ["tri ; angle", "<loc0000>", "tri\nangle", "  "])
def test_coco_category_names_follow_the_label_rule(tmp_path, name):
    """issue 38 T4: category names with ';', '<loc0000>' or a newline were accepted by train and eval
    (eval sent the prompt "detect tri\\nangle"); they are refused with the category's id."""
    p = _coco(tmp_path, ["circle", name])
    for load in (lambda: train_coco(p), lambda: eval_coco(p, "detect")):
        with pytest.raises(DataError, match=r"category id=2: .*1 annotation\(s\) are left out"):
            load()
    ds = train_coco(p, strict=False)  # skip and report: the prompt names only the good category
    assert [ex.prefix for ex in ds.examples] == ["detect circle"]
    assert any("category id=2" in str(q) for q in ds.problems)
    assert all("<loc0000>" not in ex.prefix and "\n" not in ex.prefix for ex in
               train_coco(p, strict=False, include_absent=True).examples)


def test_unreadable_image_is_found_up_front(tmp_path):
    """issue 38 T8 (up-front half): a corrupt image file is a problem on its line when the data loads
    (main trained until it reached the image at step 17 of 30)."""
    _image(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (tmp_path / "empty.jpg").write_bytes(b"")
    rows = [{"image": n, "prefix": "ocr", "suffix": "AB"} for n in ("ok.png", "bad.png", "empty.jpg")]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as e:
        train_jsonl(p)
    assert "t.jsonl:line 2:" in str(e.value) and "t.jsonl:line 3:" in str(e.value)
    assert len(train_jsonl(p, strict=False)) == 1
    assert image_problem(tmp_path / "ok.png") is None
    assert "not found" in image_problem(tmp_path / "nope.png")


def test_prefix_with_a_newline_inside_is_refused(tmp_path):
    """issue 38 T4 for JSONL rows: '\\n' inside a prefix would end the prompt early."""
    _image(tmp_path / "a.png")
    rows = [{"image": "a.png", "prefix": "caption en\n", "suffix": "ok"},  # one trailing newline is stripped
            {"image": "a.png", "prefix": "detect tri\nangle", "suffix": "x"}]
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"line 2: the prefix contains a newline"):
        train_jsonl(p)
