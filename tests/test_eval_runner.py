"""End-to-end runner tests with a fake model: report, charts, JSONL, resume after an interruption,
cached-results comparison, COCO detection, referring segmentation and prompt sensitivity."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from palikit.eval import (
    evaluate,
    evaluate_prompt_variants,
    load_cached_results,
    load_predictions,
    prompt_variants,
    save_cached_results,
)


@dataclass
class FakeDet:
    label: str
    box: tuple
    score: float | None = None
    mask: np.ndarray | None = None


@dataclass
class FakeResult:
    text: str
    detections: list = field(default_factory=list)
    errors: list = field(default_factory=list)
    timings: dict = field(default_factory=lambda: {"image_ms": 5.0, "prefill_ms": 10.0, "decode_ms": 30.0,
                                                    "decode_step_ms": 3.0})


class FakeModel:
    """Answers from a table keyed by image file name; optionally fails after `fail_after` samples."""

    name = "fake-pg"

    def __init__(self, answer, fail_after: int | None = None):
        self.answer = answer  # callable(image_path, prompt, labels) -> FakeResult
        self.fail_after = fail_after
        self.seen: list[str] = []

    def predict_batch(self, images, prompts, labels=None, **opts):
        if self.fail_after is not None and len(self.seen) + len(images) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        labels = labels or [None] * len(images)
        self.seen += [Path(i).name for i in images]
        return [self.answer(Path(i).name, p, lab) for i, p, lab in zip(images, prompts, labels)]


def _img(path: Path, size=(16, 12)):
    Image.new("RGB", size, (200, 30, 30)).save(path)


# ------------------------------------------------------------------------------ OCR dataset
TRUTH = {f"im{i}.png": t for i, t in enumerate(
    ["STOP", "ABC123", "hello world", "EXIT", "Main St", "42", "open", "cafe", "no parking", "LIMIT 30"])}
PRED = {"im0.png": "STOP", "im1.png": "ABC12", "im2.png": "Hello World", "im3.png": "EXT", "im4.png": "Main St.",
        "im5.png": "42", "im6.png": "opan", "im7.png": "", "im8.png": "no parking", "im9.png": "LIMIT 80"}


def _ocr_answer(name, prompt, labels):
    assert prompt == "ocr"
    return FakeResult(PRED[name])


@pytest.fixture()
def ocr_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    with open(d / "ocr.jsonl", "w") as f:
        for i, (name, text) in enumerate(TRUTH.items()):
            _img(d / name)
            f.write(json.dumps({"id": f"s{i}", "image": name, "text": text}) + "\n")
    return d / "ocr.jsonl"


def test_ocr_end_to_end_report_charts_and_comparison(ocr_data, tmp_path):
    cache = tmp_path / "cached.csv"
    save_cached_results(cache, [
        {"model": "gpt-4o", "metric": "accuracy", "accuracy": 90.0, "median_latency_s": 2.0, "cost_per_call": 0.004},
        {"model": "tesseract", "metric": "accuracy", "accuracy": 60.0, "median_latency_s": 0.2, "cost_per_call": None},
        {"model": "other-task", "metric": "cider", "accuracy": 120.0},
    ])
    cached = load_cached_results(cache)
    assert cached[0]["speed_efficiency"] == pytest.approx(45.0) and cached[1]["cost_efficiency"] is None

    out = tmp_path / "run"
    rep = evaluate(FakeModel(_ocr_answer), ocr_data, "ocr", batch_size=3, out_dir=out, price_per_hour=3.6,
                   progress=False, compare_with=cache)
    from palikit.eval.metrics import ocr_accuracy

    want = np.mean([ocr_accuracy(PRED[k], TRUTH[k], normalize=True) for k in TRUTH])
    assert rep.n == 10 and rep.metrics["accuracy"] == pytest.approx(want)
    assert rep.score == pytest.approx(100 * want)
    assert {"cer", "exact_match"} <= set(rep.metrics)
    assert rep.speed["median_s"] > 0 and rep.speed["p90_s"] >= rep.speed["median_s"]
    assert rep.speed["prefill_ms"] == 10.0 and rep.speed["decode_share"] == pytest.approx(0.75)
    assert rep.cost["cost_per_sample"] == pytest.approx(3.6 * rep.speed["mean_s"] / 3600)
    assert rep.speed_efficiency == pytest.approx(rep.score / rep.speed["median_s"])
    assert rep.cost_efficiency == pytest.approx(rep.score / rep.cost["cost_per_sample"])

    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [f"s{i}" for i in range(10)]
    md = (out / "report.md").read_text()
    assert "gpt-4o" in md and "tesseract" in md and "other-task" not in md and "| accuracy (primary) |" in md
    saved = json.loads((out / "report.json").read_text())
    assert saved["comparison"][0]["source"] == "this run" and len(saved["comparison"]) == 3
    for name in ("accuracy", "speed_efficiency", "cost_efficiency"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG" and im.size == (800, 450)
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_interrupted_run_resumes_and_matches_uninterrupted(ocr_data, tmp_path):
    full = evaluate(FakeModel(_ocr_answer), ocr_data, "ocr", batch_size=2, out_dir=tmp_path / "full",
                    progress=False, charts=False)

    out = tmp_path / "resumed"
    crashing = FakeModel(_ocr_answer, fail_after=5)  # batches of 2: the 3rd call raises
    with pytest.raises(KeyboardInterrupt):
        evaluate(crashing, ocr_data, "ocr", batch_size=2, out_dir=out, progress=False, charts=False)
    assert len(load_predictions(out / "predictions.jsonl")) == 4
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "s4", "text": "tor')  # killed mid-write: a torn line is ignored

    second = FakeModel(_ocr_answer)
    rep = evaluate(second, ocr_data, "ocr", batch_size=2, out_dir=out, progress=True, charts=False)
    assert second.seen == [f"im{i}.png" for i in range(4, 10)]
    assert rep.predicted_now == 6 and rep.n == 10
    assert rep.metrics == pytest.approx(full.metrics)

    third = FakeModel(_ocr_answer)  # everything cached: nothing predicted
    assert evaluate(third, ocr_data, "ocr", out_dir=out, progress=False, charts=False).metrics == \
        pytest.approx(full.metrics)
    assert third.seen == []
    with pytest.raises(ValueError, match="other prompts"):
        evaluate(third, ocr_data, "ocr", out_dir=out, progress=False, charts=False, prompt="read it")
    fresh = FakeModel(_ocr_answer)
    evaluate(fresh, ocr_data, "ocr", out_dir=out, progress=False, charts=False, resume=False)
    assert len(fresh.seen) == 10


# ------------------------------------------------------------------------------ VQA / captions / count
def test_vqa_caption_count_tasks(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png")
    rows = [{"id": "q1", "image": "a.png", "question": "what color?", "answers": ["red"] * 3 + ["blue"] * 7,
             "answer_type": "other"},
            {"id": "q2", "image": "b.png", "question": "is it?", "answers": ["yes"] * 10, "answer_type": "yes/no"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    answers = {"a.png": "Red.", "b.png": "yes"}
    prompts = []

    def ans(name, prompt, labels):
        prompts.append(prompt)
        return FakeResult(answers[name])

    rep = evaluate(FakeModel(ans), tmp_path / "vqa.jsonl", "vqa", out_dir=tmp_path / "v", progress=False,
                   charts=False)
    assert prompts == ["answer en what color?", "answer en is it?"]
    assert rep.metrics["accuracy"] == pytest.approx((0.9 + 1.0) / 2)
    assert rep.metrics["accuracy/yes/no"] == 1.0 and rep.cost["cost_per_sample"] is None

    caps = [{"id": "c1", "image": "a.png", "captions": ["a red square", "red image"]},
            {"id": "c2", "image": "b.png", "captions": ["a blue sky", "the sky"]}]
    (tmp_path / "cap.jsonl").write_text("\n".join(json.dumps(r) for r in caps))
    capt = {"a.png": "a red square", "b.png": "a blue sky"}
    rep = evaluate(FakeModel(lambda n, p, lab: FakeResult(capt[n])), tmp_path / "cap.jsonl", "caption",
                   out_dir=tmp_path / "c", progress=False, charts=False, price_per_call=0.001)
    from palikit.eval.metrics import cider_d

    assert rep.metrics["cider"] == pytest.approx(cider_d(list(capt.values()), [c["captions"] for c in caps])[0])
    assert rep.cost["cost_per_sample"] == 0.001

    cnt = [{"id": "n1", "image": "a.png", "prefix": "answer en how many dogs?", "suffix": "3"},
           {"id": "n2", "image": "b.png", "prefix": "answer en how many cats?", "suffix": "2"}]
    (tmp_path / "cnt.jsonl").write_text("\n".join(json.dumps(r) for r in cnt))
    rep = evaluate(FakeModel(lambda n, p, lab: FakeResult({"a.png": "three", "b.png": "5"}[n])),
                   tmp_path / "cnt.jsonl", "count", out_dir=tmp_path / "n", progress=False, charts=False)
    assert rep.metrics["accuracy"] == 0.5


# ------------------------------------------------------------------------------ detection (COCO json)
COCO_GT = {
    "images": [{"id": 1, "file_name": "d1.png", "width": 100, "height": 80},
               {"id": 2, "file_name": "d2.png", "width": 100, "height": 80},
               {"id": 3, "file_name": "d3.png", "width": 100, "height": 80}],
    "categories": [{"id": 1, "name": "dog"}, {"id": 2, "name": "box"}],
    "annotations": [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 20], "area": 600, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 40, 40, 30], "area": 1200, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "area": 2500, "iscrowd": 0},
    ],
}


def _coco_answer(name, prompt, labels):
    if not prompt.startswith("detect"):
        return FakeResult("I see a dog.")  # natural-language prompt: no boxes
    img = {"d1.png": 1, "d2.png": 2, "d3.png": 3}[name]
    cat = {1: "dog", 2: "box"}
    dets = []
    for a in COCO_GT["annotations"]:
        if a["image_id"] == img:
            x, y, w, h = a["bbox"]
            want = cat[a["category_id"]]
            said = next(lbl for lbl in labels if lbl.startswith(want[:2]))  # echo the requested spelling
            dets.append(FakeDet(said, (x, y, x + w, y + h), 0.9))
    return FakeResult(prompt, dets)


def test_detection_coco_and_prompt_sensitivity(tmp_path):
    import pycocotools  # noqa: F401 - a test dependency
    for im in COCO_GT["images"]:
        _img(tmp_path / im["file_name"], (100, 80))
    (tmp_path / "coco.json").write_text(json.dumps(COCO_GT))
    seen = []

    def ans(name, prompt, labels):
        seen.append(prompt)
        return _coco_answer(name, prompt, labels)

    rep = evaluate(FakeModel(ans), tmp_path / "coco.json", "detect", out_dir=tmp_path / "det", progress=False,
                   charts=False)
    assert seen == ["detect dog ; box", "detect dog"]  # image 3 has no objects: skipped
    assert rep.metrics["map"] == pytest.approx(1.0) and rep.metrics["map50"] == pytest.approx(1.0)

    assert prompt_variants("detect", langs=("fr",)) == {
        "singular": "detect {labels_singular}", "plural": "detect {labels_plural}",
        "natural": "find the {labels_natural}"}
    assert prompt_variants("vqa", langs=("fr",))["keyword@fr"] == "answer fr {question}"
    sens = evaluate_prompt_variants(FakeModel(_coco_answer), tmp_path / "coco.json", "detect",
                                    out_dir=tmp_path / "sens", progress=False)
    # this fake model answers only prompts that start with "detect": the natural wording and the
    # capitalised / upper-case keyword get no box (issue 37: case and separator variants)
    assert {k: round(v, 6) for k, v in sens.scores.items()} == {
        "default": 100.0, "singular": 100.0, "plural": 100.0, "natural": 0.0, "case-capitalised": 0.0,
        "case-upper": 0.0, "case-labels": 100.0, "sep-comma": 100.0, "sep-and": 100.0, "sep-tight": 100.0}
    assert sens.prompts["case-upper"] == "DETECT {labels_upper}" and sens.prompts["sep-and"] == "detect {labels_and}"
    assert sens.spread == pytest.approx(100.0) and sens.std == pytest.approx(np.std(list(sens.scores.values())))
    assert sens.worst == "natural" and sens.spread_by_kind() == {"wording": 100.0, "case": 100.0, "separator": 0.0}
    preds = load_predictions(tmp_path / "sens" / "plural" / "predictions.jsonl")
    assert preds["1"]["prompt"] == "detect dogs ; boxes"
    assert (tmp_path / "sens" / "sensitivity.md").read_text().count("|") > 10
    with Image.open(tmp_path / "sens" / "sensitivity.png") as im:
        assert im.size == (800, 450)


# ------------------------------------------------------------------------------ referring segmentation
def test_referring_segmentation_runner(tmp_path):
    from palikit.tasks.rle import mask_to_rle

    gt = np.zeros((20, 30), bool)
    gt[5:15, 10:20] = True
    rows = []
    for i in range(3):
        _img(tmp_path / f"s{i}.png", (30, 20))
        rows.append({"id": f"r{i}", "image": f"s{i}.png", "prefix": "the red thing", "mask": mask_to_rle(gt)})
    (tmp_path / "ref.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    half = np.zeros_like(gt)
    half[5:15, 10:15] = True

    def ans(name, prompt, labels):
        assert prompt == "the red thing"  # the row's prefix is kept
        if name == "s0.png":
            return FakeResult("", [FakeDet("", (10, 5, 20, 15), None, gt)])
        if name == "s1.png":
            return FakeResult("", [FakeDet("", (10, 5, 15, 15), None, half)])
        return FakeResult("garbage", errors=["no loc tokens"])  # invalid -> IoU 0

    rep = evaluate(FakeModel(ans), tmp_path / "ref.jsonl", "segment", out_dir=tmp_path / "seg", progress=False,
                   charts=False)
    assert rep.metrics["miou"] == pytest.approx(0.5)  # (1 + .5 + 0) / 3
    assert rep.metrics["boxacc/0.5"] == pytest.approx(2 / 3) and rep.metrics["boxacc/0.75"] == pytest.approx(1 / 3)
    assert rep.metrics["invalid"] == 1
    # masks survive the JSONL round trip (resume path)
    preds = load_predictions(tmp_path / "seg" / "predictions.jsonl")
    assert np.array_equal(preds["r1"]["detections"][0]["mask"], half)


# ------------------------------------------------------------------------------ COCO segmentation
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own numpy-2 warning
def test_coco_segmentation_runner(tmp_path):
    import pycocotools  # noqa: F401 - a test dependency
    from pycocotools import mask as mask_utils

    poly_a = [[4, 4, 16, 4, 16, 16, 4, 16]]
    poly_b = [[22, 22, 36, 22, 36, 36, 22, 36]]
    gt = {"images": [{"id": 7, "file_name": "m.png", "width": 40, "height": 40}],
          "categories": [{"id": 3, "name": "cat"}],
          "annotations": [{"id": 1, "image_id": 7, "category_id": 3, "segmentation": poly_a, "bbox": [4, 4, 12, 12],
                           "area": 144, "iscrowd": 0},
                          {"id": 2, "image_id": 7, "category_id": 3, "segmentation": poly_b,
                           "bbox": [22, 22, 14, 14], "area": 196, "iscrowd": 0}]}
    (tmp_path / "segm.json").write_text(json.dumps(gt))
    _img(tmp_path / "m.png", (40, 40))
    mask_a = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(poly_a, 40, 40))).astype(bool)

    def ans(name, prompt, labels):
        assert prompt == "segment cat"
        return FakeResult("", [FakeDet("cat", (4, 4, 16, 16), 0.8, mask_a)])  # only instance A found

    rep = evaluate(FakeModel(ans), tmp_path / "segm.json", "segment", out_dir=tmp_path / "s", progress=False,
                   charts=False)
    assert rep.metrics["miou"] == pytest.approx(0.5)  # (1 + 0) / 2 ground-truth instances
    assert rep.metrics["mask_map50"] == pytest.approx(51 / 101, abs=1e-6)  # recall .5 at precision 1
    assert rep.primary == "miou" and rep.score == pytest.approx(50.0)


def test_ocr_per_domain(tmp_path):
    _img(tmp_path / "a.png")
    rows = [{"id": "1", "image": "a.png", "text": "abcd", "domain": "plates"},
            {"id": "2", "image": "a.png", "text": "abcd", "domain": "signs"}]
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    outs = iter(["abcd", "abcz"])
    rep = evaluate(FakeModel(lambda n, p, lab: FakeResult(next(outs))), tmp_path / "o.jsonl", "ocr", batch_size=1,
                   out_dir=tmp_path / "o", progress=False, charts=False)
    assert rep.metrics["accuracy/domain/plates"] == 1.0 and rep.metrics["accuracy/domain/signs"] == 0.75


def test_resume_refuses_predictions_of_another_model(ocr_data, tmp_path):
    out = tmp_path / "run"
    first = FakeModel(_ocr_answer, fail_after=4)
    first.fingerprint = lambda: "aaaa"
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, ocr_data, "ocr", batch_size=2, out_dir=out, progress=False, charts=False)
    other = FakeModel(_ocr_answer)
    other.fingerprint = lambda: "bbbb"
    with pytest.raises(ValueError, match="another model"):
        evaluate(other, ocr_data, "ocr", batch_size=2, out_dir=out, progress=False, charts=False)
    assert other.seen == []
    same = FakeModel(_ocr_answer)
    same.fingerprint = lambda: "aaaa"
    evaluate(same, ocr_data, "ocr", batch_size=2, out_dir=out, progress=False, charts=False)
    assert len(same.seen) == 6  # resumed: only what the first run had not done
    evaluate(other, ocr_data, "ocr", batch_size=2, out_dir=out, progress=False, charts=False, resume=False)
    assert len(other.seen) == 10


def test_palikit_fingerprint_follows_the_weights(tmp_path):
    import torch

    from palikit.api import PaliGemma
    from palikit.testing import make_tiny_checkpoint

    pg = PaliGemma.from_pretrained(make_tiny_checkpoint(tmp_path / "ck", family="pg1"), device="cpu")
    before = pg.fingerprint()
    assert before == pg.fingerprint() and len(before) == 16
    with torch.no_grad():
        pg.model.language_model.embed_tokens.weight[0, 0] += 1.0
    assert pg.fingerprint() != before
