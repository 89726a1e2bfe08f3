"""Evaluation data a user gets wrong (issues 37 and 38, eval side), each read the way `palikit eval`
reads it: label and answer TYPES (a string is one answer, numbers are their text, anything else is a
clear error), JSON errors with line and column, eval's own flags in eval's hints, missing and
unreadable images (skipped with --skip-bad-rows, failed samples without it, --images suggested for a
classic COCO layout), and the exit status past --max-failed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from palikit.datafiles import DataError, as_text, as_texts
from palikit.eval import evaluate, load_coco, load_jsonl


class Echo:
    """Answers every image with its file stem; detect: one box per requested label."""

    name = "echo"

    def predict_batch(self, images, prompts, labels=None, **opts):
        labels = labels or [None] * len(images)
        return [{"text": Path(i).stem, "detections": [{"label": lab, "box": [2, 2, 12, 12], "score": 0.9}
                                                      for lab in (ls or [])]}
                for i, ls in zip(images, labels)]


def _png(path: Path, size=(32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, "white").save(path)


def _jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if isinstance(r, dict) and "image" in r and not (path.parent / r["image"]).exists():
            _png(path.parent / r["image"])
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _coco(folder: Path, *, names=("star", "moon"), file_prefix="") -> dict:
    return {"images": [{"id": i, "file_name": f"{file_prefix}{i}.png", "width": 32, "height": 32} for i in (1, 2)],
            "categories": [{"id": k + 1, "name": n} for k, n in enumerate(names)],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 2, "bbox": [2, 2, 10, 10], "area": 100,
                             "iscrowd": 0}]}


# ------------------------------------------------------------------------------ T5: label and answer types
@pytest.mark.parametrize("value, expected", [
    ("square", ["square"]), (5, ["5"]), (2.5, ["2.5"]), (["a", 3], ["a", "3"]), ([], []),
])
def test_answers_a_string_is_one_answer_numbers_are_their_text(value, expected):
    assert as_texts(value, '"answers"') == expected


@pytest.mark.parametrize("value, match", [
    (True, r'"answers" is true: a boolean: write the answer as text, e.g. "yes"'),
    (None, r'"answers" is null: give a string or a number'),
    ({"a": 1}, r'"answers" is \{"a": 1\}: give a string or a number'),
    ([["x"]], r'"answers"\[0\] is \["x"\]: give a string or a number'),
])
def test_answers_of_other_types_are_clear_errors(value, match):
    with pytest.raises(ValueError, match=match):
        as_texts(value, '"answers"')
    with pytest.raises(ValueError):
        as_text([1], "x")


def test_eval_scores_a_string_answer_as_one_answer_and_numbers_as_text(tmp_path):
    data = _jsonl(tmp_path / "d" / "qa.jsonl", [
        {"image": "square.png", "question": "what shape", "answers": "square"},
        {"image": "5.png", "question": "how many", "answers": 5},
        {"image": "7.png", "question": "how many", "answer": 7},
    ])
    ds = load_jsonl(data, "vqa")
    assert [s.refs for s in ds.samples] == [["square"], ["5"], ["7"]]  # main: ['s','q','u','a','r','e'], crash
    rep = evaluate(Echo(), data, "exact", out_dir=tmp_path / "o", progress=False, charts=False)
    assert rep.score == pytest.approx(100.0)


def test_bad_answer_types_are_row_problems_with_line_numbers(tmp_path):
    data = _jsonl(tmp_path / "d" / "qa.jsonl", [
        {"image": "a.png", "question": "q", "answers": "yes"},
        {"image": "b.png", "question": "q", "answers": {"text": "no"}},
        {"image": "c.png", "question": "q", "answers": True},
    ])
    with pytest.raises(DataError) as e:
        load_jsonl(data, "vqa")
    msg = str(e.value)
    assert 'line 2: "answers" is {"text": "no"}' in msg and 'line 3: "answers" is true' in msg
    assert "--skip-bad-rows" in msg and "strict_data" not in msg
    assert [s.refs for s in load_jsonl(data, "vqa", strict=False).samples] == [["yes"]]


def test_coco_category_named_with_a_number_is_its_text(tmp_path):
    for i in (1, 2):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "gt.json").write_text(json.dumps(_coco(tmp_path, names=(5, "moon"))))
    ds = load_coco(tmp_path / "gt.json", "detect")
    assert [s.labels for s in ds.samples] == [["5"], ["moon"]]  # main: AttributeError traceback
    rep = evaluate(Echo(), ds, "detect", out_dir=tmp_path / "o", progress=False, charts=False)
    assert rep.metrics["map50"] == pytest.approx(1.0)


def test_coco_category_name_of_a_wrong_type_is_a_clear_error(tmp_path):
    for i in (1, 2):
        _png(tmp_path / f"{i}.png")
    (tmp_path / "gt.json").write_text(json.dumps(_coco(tmp_path, names=(["star"], "moon"))))
    with pytest.raises(DataError, match=r'category id=1: its "name" is \["star"\]: give a string or a number'):
        load_coco(tmp_path / "gt.json", "detect")
    ds = load_coco(tmp_path / "gt.json", "detect", strict=False)  # --skip-bad-rows: that category goes
    assert [s.labels for s in ds.samples] == [["moon"]]


# ------------------------------------------------------------------------------ JSON errors, eval's hints
def test_truncated_coco_file_names_line_column_and_says_it_is_cut_off(tmp_path):
    text = json.dumps(_coco(tmp_path), indent=1)
    cut = text[:text.index('"file_name"') + 16]  # inside the string "1.png"
    (tmp_path / "gt.json").write_text(cut)
    with pytest.raises(DataError) as e:
        load_coco(tmp_path / "gt.json", "detect")
    msg = str(e.value)
    line = cut.count("\n") + 1
    assert f"invalid JSON: Unterminated string starting at line {line}, column " in msg  # main: position cut off
    assert "looks truncated" in msg and "download the whole file again" in msg
    assert "strict_data" not in msg and "--skip-bad-rows" not in msg  # skipping cannot help a file that does not parse


def test_broken_jsonl_line_gives_its_column_and_eval_file_errors_name_no_train_key(tmp_path):
    data = _jsonl(tmp_path / "d" / "o.jsonl", [{"image": "a.png", "text": "x"}, '{"image": "b.png", "text": "y'])
    with pytest.raises(DataError, match=r"line 2: invalid JSON: Unterminated string starting at column 28"):
        load_jsonl(data, "ocr")
    for missing in (tmp_path / "none.jsonl", tmp_path / "none.json"):
        with pytest.raises(DataError) as e:
            load_jsonl(missing, "ocr") if missing.suffix == ".jsonl" else load_coco(missing)
        assert "file not found" in str(e.value) and "check the path" in str(e.value)
        assert "strict_data" not in str(e.value)


# ------------------------------------------------------------------------------ images, --images, --max-failed
@pytest.fixture
def fake_model(monkeypatch):
    """`palikit eval` in process with the Echo model in place of a checkpoint (the CLI's own logic)."""
    import palikit.cli.predict

    monkeypatch.setattr(palikit.cli.predict, "load_model", lambda *a, **k: Echo())


def _eval(args, capsys) -> tuple[int, str, str]:
    from palikit.cli import main

    try:
        code = main(["eval", *map(str, args), "--device", "cpu", "--no-progress"])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def _classic_coco(root: Path) -> Path:
    """annotations/instances.json beside images/ (file_name relative to images/): COCO's own layout."""
    (root / "annotations").mkdir(parents=True)
    for i in (1, 2):
        _png(root / "images" / f"{i}.png")
    (root / "annotations" / "instances.json").write_text(json.dumps(_coco(root)))
    return root / "annotations" / "instances.json"


def test_classic_coco_layout_without_images_flag_says_which_folder(tmp_path, capsys, fake_model):
    gt = _classic_coco(tmp_path)
    code, out, err = _eval([gt, "--task", "detect", "--out", tmp_path / "o"], capsys)
    assert code == 2, err  # main: "2 images, 2 failed", exit 0, the reason only in report.md
    assert "none of its 2 images can be read" in err and "image file not found" in err
    assert f"pass --images {tmp_path / 'images'}" in err and "Traceback" not in err
    code, out, err = _eval([gt, "--task", "detect", "--images", tmp_path / "images", "--out", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "(2 images, 0 failed)" in out


def test_failed_samples_past_max_failed_exit_1_with_the_first_reasons(tmp_path, capsys, fake_model):
    rows = [{"image": f"w{i}.png", "text": f"w{i}"} for i in range(6)]
    data = _jsonl(tmp_path / "d" / "ocr.jsonl", rows)
    (tmp_path / "d" / "w1.png").unlink()
    (tmp_path / "d" / "w4.png").write_bytes(b"not an image")
    out_dir = tmp_path / "o"
    code, out, err = _eval([data, "--task", "ocr", "--out", out_dir], capsys)
    assert code == 1, err  # main: exit 0
    assert "2 of 6 samples failed (more than --max-failed 0)" in err
    assert "sample 1: image file not found" in err and "sample 4: not a readable image" in err
    report = json.loads((out_dir / "report.json").read_text())
    assert report["failed"] == 2 and report["n"] == 6  # the report is still written
    assert "sample 1: image file not found" in (out_dir / "report.md").read_text()

    code, out, err = _eval([data, "--task", "ocr", "--out", out_dir, "--max-failed", "2"], capsys)
    assert code == 0 and "(6 images, 2 failed)" in out

    code, out, err = _eval([data, "--task", "ocr", "--out", tmp_path / "skip", "--skip-bad-rows"], capsys)
    assert code == 0, err  # main: --skip-bad-rows changed nothing for missing images
    report = json.loads((tmp_path / "skip" / "report.json").read_text())
    assert report["n"] == 4 and report["failed"] == 0 and report["score"] == pytest.approx(100.0)
    assert [s["where"] for s in report["skipped"]] == ["sample 1", "sample 4"]
    assert "(4 images, 0 failed, 2 skipped)" in out
    assert "2 bad row(s) / image(s) skipped" in (tmp_path / "skip" / "report.md").read_text()
