"""The runner drives the real `PaliGemma` API (a tiny random checkpoint: random outputs, real
machinery): text and detection tasks, timings collected, resume skips finished samples."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from palikit.eval import evaluate, load_predictions


@pytest.fixture(scope="module")
def pg(tmp_path_factory):
    from palikit.api import PaliGemma
    from palikit.testing import make_tiny_checkpoint

    folder = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))
    return PaliGemma.from_pretrained(folder, device="cpu", dtype="float32")


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

    coco = {"images": [{"id": 1, "file_name": "i0.png", "width": 40, "height": 30}],
            "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [5, 5, 20, 20], "area": 400,
                             "iscrowd": 0}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    rep = evaluate(pg, tmp_path / "coco.json", "detect", out_dir=tmp_path / "d", progress=False, charts=False,
                   predict_options={"max_new_tokens": 8})
    assert rep.n == 1 and 0.0 <= rep.metrics["map"] <= 1.0
    assert load_predictions(tmp_path / "d" / "predictions.jsonl")["1"]["prompt"] == "detect dog"
