"""The demo data the lab writes: a shapes v2 split reads back through palikit's eval readers with every
target tokenizing and the same bytes on a second run, and the hand-made test set (lab/demo/handmade.py),
whose JSON must describe its PNGs, whose eval files agree with the truth, and which `palikit eval` scores."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from lab.demo.paths import CHECKOUT
from palikit.demo.splits import write_split
from palikit.demo import shapes2
from palikit.demo.shapes2 import CLASSES, color_name

HANDMADE = CHECKOUT / "lab" / "data" / "handmade"


def test_write_split_reads_back_and_every_target_tokenizes(tmp_path):
    from lab.demo.build import CHARS, TASK_WORDS
    from palikit.eval.datasets import load_coco, load_jsonl
    from palikit.tokenizer import build_tokenizer

    d = write_split(shapes2, tmp_path / "v2", "validation", 24, seg_fn=lambda s: [3] * 16)
    rows = [json.loads(x) for x in (d / "validation.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} == {"caption", "detect", "segment", "ocr", "count", "color", "refer_detect",
                                        "refer_segment"}
    tok = build_tokenizer(sorted(set(shapes2.vocabulary() + TASK_WORDS)) + CHARS, tmp_path / "tok.json")
    for r in rows:
        assert tok.unk_id not in tok.encode_prompt(r["prefix"], r["suffix"]).ids, r
    coco = json.loads((d / "validation_coco.json").read_text())
    assert len({(im["width"], im["height"]) for im in coco["images"]}) > 10
    assert len(load_coco(d / "validation_coco.json", "detect").samples) == 24
    seg = tmp_path / "refer_segment.jsonl"
    seg.write_text("\n".join(json.dumps(r) for r in rows if r["task"] == "refer_segment") + "\n")
    ds = load_jsonl(seg, "segment", image_root=d)
    assert len(ds) and all(s.meta["gt_mask"].any() for s in ds.samples)
    again = write_split(shapes2, tmp_path / "again", "validation", 24, seg_fn=lambda s: [3] * 16)
    assert (again / "validation.jsonl").read_text() == (d / "validation.jsonl").read_text()


def test_handmade_json_matches_its_pngs():
    truth = json.loads((HANDMADE / "truth.json").read_text())
    assert len(truth) == 20 and sum(p.stat().st_size for p in HANDMADE.iterdir()) < 1_000_000
    assert {o["label"] for t in truth for o in t["objects"]} == set(CLASSES)
    first = truth[0]
    assert (first["width"], first["height"]) == (224, 224)
    assert [(o["label"], o["color"], o["box"]) for o in first["objects"]] == [
        ("circle", "red", [40, 60, 120, 140]), ("square", "blue", [140, 30, 200, 90])]
    for t in truth:
        arr = np.asarray(Image.open(HANDMADE / t["image"]).convert("RGB"))
        assert arr.shape == (t["height"], t["width"], 3)
        for o in t["objects"]:
            x0, y0, x1, y1 = o["box"]
            px, py = o["point"]
            assert x0 <= px < x1 and y0 <= py < y1 and color_name(arr[py, px]) == o["color"], (t["image"], o)
            assert tuple(arr[py, px]) == tuple(o["rgb"])
            if o["occluded"]:
                continue
            assert (px, py) == ((x0 + x1) // 2, (y0 + y1) // 2)
            # the pixels of the object's colour around its box span the box (its outline aside)
            pad = 4
            sub = arr[max(y0 - pad, 0):y1 + pad, max(x0 - pad, 0):x1 + pad]
            hit = np.array([[color_name(p) == o["color"] for p in row] for row in sub])
            for other in t["objects"]:  # a same-coloured neighbour touching this one is not part of it
                if other is not o and other["color"] == o["color"]:
                    ox0, oy0, ox1, oy1 = other["box"]
                    hit[max(oy0 - max(y0 - pad, 0), 0):max(oy1 - max(y0 - pad, 0), 0),
                        max(ox0 - max(x0 - pad, 0), 0):max(ox1 - max(x0 - pad, 0), 0)] = False
            ys, xs = np.nonzero(hit)
            got = (xs.min() + max(x0 - pad, 0), ys.min() + max(y0 - pad, 0),
                   xs.max() + 1 + max(x0 - pad, 0), ys.max() + 1 + max(y0 - pad, 0))
            # 2 px: a star tip's last pixels are half background; an outline grows a polygon about its centre
            tol = 2 + 2 * o["outline"]
            assert all(abs(g - e) <= tol for g, e in zip(got, o["box"])), (t["image"], o, got)


def test_handmade_eval_files_agree_with_the_truth():
    from palikit.eval.datasets import load_coco
    from palikit.tasks.parse import parse_detections

    truth = json.loads((HANDMADE / "truth.json").read_text())
    rows = [json.loads(x) for x in (HANDMADE / "detect.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    for t, r in zip(truth, rows):
        assert r["image"] == t["image"] and (HANDMADE / r["image"]).is_file()
        labels = {o["label"] for o in t["objects"]}
        assert set(r["prefix"][len("detect "):].split(" ; ")) == labels
        got = sorted((d.label, d.box) for d in parse_detections(r["suffix"], (t["width"], t["height"])).detections)
        want = sorted((o["label"], o["box"]) for o in t["objects"])
        assert [g[0] for g in got] == [w[0] for w in want]
        for (_, gb), (_, wb) in zip(got, want):  # within one <loc> bin
            assert max(abs(a - b) for a, b in zip(gb, wb)) <= max(t["width"], t["height"]) / 1024 + 1e-6
    ds = load_coco(HANDMADE / "coco.json", "detect")
    assert len(ds) == 20 and len(ds.coco["annotations"]) == sum(len(t["objects"]) for t in truth)


@pytest.mark.slow  # the script's process
def test_handmade_script_is_deterministic(tmp_path):
    subprocess.run([sys.executable, "-m", "lab.demo.handmade", "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=CHECKOUT)
    for name in ("truth.json", "detect.jsonl", "coco.json"):
        assert (tmp_path / name).read_text() == (HANDMADE / name).read_text(), name
    for i in range(20):
        a, b = (np.asarray(Image.open(d / f"{i:02d}.png")) for d in (tmp_path, HANDMADE))
        assert (a == b).all()


def test_palikit_eval_scores_the_handmade_set(tmp_path):
    """`palikit eval lab/data/handmade/coco.json --task detect` runs on the set (bundled demo model)."""
    from palikit.cli import main

    code = main(["eval", str(HANDMADE / "coco.json"), "--task", "detect", "--out", str(tmp_path), "--torch-threads", "1",
                 "--no-progress"])
    assert code in (0, None)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["n"] == 20 and 0.0 <= report["metrics"]["map50"] <= 1.0


def test_finetune_set_writes_three_splits_of_the_new_classes(tmp_path):
    """issue 37: `finetune_set` crashed with `ValueError: Sample larger than population` (shapes2 sampled
    up to 3 of its 2 classes); the recipe needs a validation split too."""
    from lab.demo.finetune_set import main

    main(["--out", str(tmp_path), "--train", "6", "--val", "3", "--test", "2"])
    for split, n in (("train", 6), ("validation", 3), ("test", 2)):
        coco = json.loads((tmp_path / f"{split}_coco.json").read_text())
        assert len(coco["images"]) == n and [c["name"] for c in coco["categories"]] == ["ring", "diamond"]
        rows = [json.loads(x) for x in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
        detect = [r for r in rows if r["task"] == "detect"]
        assert detect and all(set(r["prefix"].split(" ", 1)[1].split(" ; ")) <= {"ring", "diamond"} for r in detect)
