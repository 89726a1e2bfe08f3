"""The runner drives the real `PaliGemma` API (a tiny random checkpoint: random outputs, real
machinery): text and detection tasks, timings collected, resume skips finished samples. Each
report's metrics equal a recomputation from the predictions file it wrote (OCR with the metric
definitions, detection with pycocotools' own COCOeval), and those predictions are the model's."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
from PIL import Image

from palikit.eval import evaluate, load_predictions
from palikit.eval.metrics import corpus_cer, exact_match, mean, ocr_accuracy


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    from palikit.api import PaliGemma
    from palikit.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return PaliGemma.from_pretrained(folder, device="cpu", dtype="float32")


def _pycocotools_ap(coco: dict, recs: dict) -> dict[str, float]:
    """COCO box AP of the records' detections, straight through pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    names = {c["name"]: c["id"] for c in coco["categories"]}
    res = [{"image_id": int(i), "category_id": names[d["label"]], "score": 1.0 if d["score"] is None else d["score"],
            "bbox": [d["box"][0], d["box"][1], d["box"][2] - d["box"][0], d["box"][3] - d["box"][1]]}
           for i, r in recs.items() for d in r["detections"] if d["label"] in names]
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"info": {}, "licenses": [], **coco}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(res), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map": ev.stats[0], "map50": ev.stats[1], "map75": ev.stats[2]}


def test_real_model_ocr_and_detect(pg, tmp_path):
    rows = []
    for i in range(3):
        Image.new("RGB", (40 + 10 * i, 30), (10 * i, 100, 200)).save(tmp_path / f"i{i}.png")
        rows.append({"id": i, "image": f"i{i}.png", "text": "red"})
    (tmp_path / "ocr.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rep = evaluate(pg, tmp_path / "ocr.jsonl", "ocr", batch_size=2, out_dir=tmp_path / "o", progress=False,
                   charts=False, predict_options={"max_new_tokens": 4}, price_per_hour=1.0)
    assert rep.n == 3 and 0.0 <= rep.metrics["accuracy"] <= 1.0
    assert {"median_s", "prefill_ms", "decode_ms"} <= set(rep.speed)
    assert rep.cost["cost_per_sample"] > 0
    recs = load_predictions(tmp_path / "o" / "predictions.jsonl")
    assert set(recs) == {"0", "1", "2"} and all(r["prompt"] == "ocr" for r in recs.values())
    for i in range(3):  # the records are what the model answers for that image
        assert recs[str(i)]["text"] == pg.predict(tmp_path / f"i{i}.png", "ocr", max_new_tokens=4).text
    texts = [recs[str(i)]["text"] for i in range(3)]
    assert rep.metrics["accuracy"] == pytest.approx(mean(ocr_accuracy(t, "red", normalize=True) for t in texts),
                                                    abs=1e-12)
    assert rep.metrics["exact_match"] == pytest.approx(mean(exact_match(t, "red", normalize=True) for t in texts),
                                                       abs=1e-12)
    assert rep.metrics["cer"] == pytest.approx(corpus_cer(texts, ["red"] * 3, normalize=True), abs=1e-12)
    assert json.loads((tmp_path / "o" / "report.json").read_text())["metrics"]["accuracy"] == rep.metrics["accuracy"]

    Image.new("RGB", (50, 30), (200, 100, 10)).save(tmp_path / "i9.png")
    coco = {"images": [{"id": 1, "file_name": "i0.png", "width": 40, "height": 30},
                       {"id": 2, "file_name": "i9.png", "width": 50, "height": 30}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [5, 5, 20, 20], "area": 400,
                             "iscrowd": 0},
                            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [10, 5, 25, 20], "area": 500,
                             "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    # image 2 already has a record (a perfect box): the run resumes, predicts only image 1, scores both
    (tmp_path / "d").mkdir()
    seeded = {"id": "2", "prompt": "detect cat", "text": "", "errors": [], "timings": {}, "latency_s": 0.1,
              "detections": [{"label": "cat", "box": [10.0, 5.0, 35.0, 25.0], "score": 0.9, "mask": None}]}
    (tmp_path / "d" / "predictions.jsonl").write_text(json.dumps(seeded) + "\n")
    rep = evaluate(pg, tmp_path / "coco.json", "detect", out_dir=tmp_path / "d", progress=False, charts=False,
                   predict_options={"max_new_tokens": 8})
    assert rep.n == 2 and rep.predicted_now == 1
    recs = load_predictions(tmp_path / "d" / "predictions.jsonl")
    assert recs["1"]["prompt"] == "detect dog" and recs["2"] == seeded
    expected = _pycocotools_ap(coco, recs)
    for k, v in expected.items():
        assert math.isclose(rep.metrics[k], v, abs_tol=1e-12), (k, rep.metrics[k], v)
    assert rep.metrics["map50"] > 0  # the seeded box is scored: the metric reads the predictions
