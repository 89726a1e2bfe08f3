"""Detect / segment evaluation beyond localisation (issue 37): classes absent from the image asked for
too (`--negatives N`) with the false-positive rate (the field report's "hallucinated result"), AP per
class, and no COCO -1 sentinel printed as -100 in the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from palikit.eval import evaluate, load_coco

CLASSES = ("circle", "square", "triangle", "star")
BOXES = {1: [("circle", [2, 2, 10, 10])], 2: [("square", [4, 4, 12, 12]), ("star", [20, 20, 8, 8])],
         3: [("triangle", [6, 6, 10, 10])], 4: []}  # image 4 holds nothing


@pytest.fixture
def coco(tmp_path) -> Path:
    gt = {"images": [], "annotations": [], "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CLASSES)]}
    for img, objs in BOXES.items():
        Image.new("RGB", (40, 40), "white").save(tmp_path / f"{img}.png")
        gt["images"].append({"id": img, "file_name": f"{img}.png", "width": 40, "height": 40})
        for cls, box in objs:
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": img, "bbox": box, "iscrowd": 0,
                                      "category_id": CLASSES.index(cls) + 1, "area": box[2] * box[3]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json"


class Boxer:
    """Boxes every requested label at its true place; `hallucinate` also boxes absent ones (at 0,0)."""

    name = "boxer"

    def __init__(self, hallucinate: set[str] = frozenset()):
        self.hallucinate = hallucinate

    def predict_batch(self, images, prompts, labels=None, **opts):
        out = []
        for image, labs in zip(images, labels):
            truth = dict(BOXES[int(Path(image).stem)])
            dets = [{"label": lab, "box": [truth[lab][0], truth[lab][1], truth[lab][0] + truth[lab][2],
                                           truth[lab][1] + truth[lab][3]], "score": 0.9}
                    for lab in labs if lab in truth]
            dets += [{"label": lab, "box": [0, 0, 5, 5], "score": 0.8} for lab in labs
                     if lab not in truth and lab in self.hallucinate]
            out.append({"text": "", "detections": dets})
        return out


def test_negatives_ask_absent_classes_deterministically(coco):
    plain = load_coco(coco, "detect")
    assert [s.labels for s in plain.samples] == [["circle"], ["square", "star"], ["triangle"]]  # image 4 skipped
    neg = load_coco(coco, "detect", negatives=2)
    assert [s.id for s in neg.samples] == ["1", "2", "3", "4"]  # the empty image is asked too
    for s in neg.samples:
        present = {c for c, _ in BOXES[int(s.id)]}
        assert set(s.labels) - present == set(s.meta["negatives"]) and len(s.meta["negatives"]) == 2
        assert s.labels == [c for c in CLASSES if c in s.labels]  # category order: absent ones not always last
    assert [s.labels for s in load_coco(coco, "detect", negatives=2).samples] == [s.labels for s in neg.samples]
    assert any(s.labels != t.labels for s, t in zip(neg.samples, load_coco(coco, "detect", negatives=2, seed=1).samples))
    with pytest.raises(ValueError, match="negatives must be a whole number"):
        load_coco(coco, "detect", negatives=-1)


def test_false_positive_rate_on_absent_classes_and_per_class_ap(coco, tmp_path):
    honest = evaluate(Boxer(), load_coco(coco, "detect", negatives=2), "detect", out_dir=tmp_path / "a",
                      progress=False, charts=False)
    assert honest.metrics["map"] == pytest.approx(1.0) and honest.metrics["negatives_fp_rate"] == 0.0

    ds = load_coco(coco, "detect", negatives=2)
    liar = evaluate(Boxer(hallucinate={"circle"}), ds, "detect", out_dir=tmp_path / "b", progress=False, charts=False)
    asked_circle = sum("circle" in s.meta["negatives"] for s in ds.samples)
    queries = sum(len(s.meta["negatives"]) for s in ds.samples)
    assert asked_circle > 0
    assert liar.metrics["negatives_fp_rate"] == pytest.approx(asked_circle / queries)
    assert liar.metrics["class/circle/fp_rate"] == 1.0 and liar.metrics.get("class/square/fp_rate", 0.0) == 0.0
    # scored below the true box, the false positives leave circle's AP at 1: AP alone does not show
    # them, the false-positive rate does
    assert liar.metrics["class/circle/map"] == pytest.approx(1.0)
    assert liar.metrics["class/square/map"] == pytest.approx(1.0)
    per = liar.counts["per_class"]
    assert per["circle"] == {"instances": 1, "negative_queries": asked_circle, "false_positive_queries": asked_circle}
    md = (tmp_path / "b" / "report.md").read_text()
    assert "## Per class (x100)" in md and "| circle | 100.00 | 100.00 | 1 |" in md
    assert f"{asked_circle} of {queries} queries for a class the image does not hold were answered with a box" in md
    assert "| negatives_fp_rate |" in md


def test_no_sentinel_minus_100_in_reports(coco, tmp_path):
    rep = evaluate(Boxer(), coco, "detect", out_dir=tmp_path / "o", progress=False, charts=False)
    assert rep.metrics["map_large"] is None  # no object over 96x96 px (main: -1.0, printed -100.00)
    md = (tmp_path / "o" / "report.md").read_text()
    assert "-100" not in md and "| map_large | n/a |" in md
    assert json.loads((tmp_path / "o" / "report.json").read_text())["metrics"]["map_large"] is None


def test_gallery_of_the_worst_predictions_linked_from_the_report(coco, tmp_path):
    ds = load_coco(coco, "detect", negatives=2)
    rep = evaluate(Boxer(hallucinate={"circle", "square"}), ds, "detect", out_dir=tmp_path / "g", progress=False,
                   charts=False)
    wrong = {s.id for s in ds.samples if {"circle", "square"} & set(s.meta["negatives"])}
    assert wrong and {w["id"] for w in rep.worst} == wrong  # exactly the images that got a box for an absent class
    assert all(w["score"] < 1 and "of an absent class" in w["why"] for w in rep.worst)
    assert [w["score"] for w in rep.worst] == sorted(w["score"] for w in rep.worst)  # worst first
    with Image.open(rep.files["gallery"]) as im:
        cols = min(4, len(wrong))
        assert im.size == (cols * 256 + (cols - 1) * 4, -(-len(wrong) // cols) * (256 + 64 + 4) - 4)
        assert len(im.convert("RGB").getcolors(maxcolors=1 << 20)) > 10  # drawn, not blank
    md = (tmp_path / "g" / "report.md").read_text()
    assert "[![worst predictions](worst.png)](worst.png)" in md and f"## Worst predictions ({len(wrong)})" in md

    perfect = evaluate(Boxer(), ds, "detect", out_dir=tmp_path / "g", progress=False, charts=False, resume=False)
    assert not perfect.worst and "gallery" not in perfect.files and not (tmp_path / "g" / "worst.png").exists()
    assert "Worst predictions" not in (tmp_path / "g" / "report.md").read_text()


def test_gallery_ranks_text_answers_by_their_score(tmp_path):
    rows = [{"image": f"{w}.png", "text": t} for w, t in (("STOP", "STOP"), ("EXIT", "EXIT"), ("OPEN", "OPEN"),
                                                          ("CAFE", "CAKE"), ("BUS", "TAXI"))]
    for r in rows:
        Image.new("RGB", (30, 12), "white").save(tmp_path / r["image"])
    (tmp_path / "o.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    class Stem:
        def predict_batch(self, images, prompts, labels=None, **o):
            return [{"text": Path(i).stem} for i in images]

    rep = evaluate(Stem(), tmp_path / "o.jsonl", "ocr", out_dir=tmp_path / "r", progress=False, charts=False)
    assert [w["id"] for w in rep.worst] == ["4", "3"]  # BUS vs TAXI (0.0), then CAFE vs CAKE (0.75)
    assert rep.worst[0]["why"] == "answer: 'BUS'; expected: 'TAXI'"
    assert Path(rep.files["gallery"]).is_file()
