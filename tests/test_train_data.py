"""JSONL and COCO -> PaliGemma examples; every bad line is reported with file and line."""

from __future__ import annotations

import json

import numpy as np
import pytest

from palikit.datafiles import DataError
from palikit.train.data import box_tokens, decode_segmentation, load_coco, load_examples, load_jsonl
from helpers.train import write_dataset, write_images
def test_jsonl_relative_paths(tmp_path):
    path = write_dataset(tmp_path)
    ds = load_jsonl(path)
    assert len(ds) == 4 and not ds.problems
    assert ds[0].image == str(tmp_path / "images" / "red.png")
    assert ds[0].prefix == "caption en" and ds[0].suffix == "a big red square on the left"
    assert ds[1].source == f"{path}:2"
    assert len(load_examples(path)) == 4


def test_jsonl_bad_lines_reported_with_line_numbers(tmp_path):
    path = write_dataset(tmp_path)
    good = path.read_text().splitlines()
    bad = [
        '{"image": "images/red.png", "prefix": "caption en"',  # 5: invalid JSON
        json.dumps({"image": "images/red.png", "prefix": "x"}),  # 6: missing suffix
        json.dumps({"image": "images/nope.png", "prefix": "x", "suffix": "y"}),  # 7: missing image
        "",  # blank lines are fine
        json.dumps([1, 2]),  # 9: not an object
        json.dumps({"image": "images/red.png", "prefix": 3, "suffix": "y"}),  # 10: wrong type
    ]
    path.write_text("\n".join(good + bad) + "\n")
    with pytest.raises(DataError) as e:
        load_jsonl(path)
    msg = str(e.value)
    assert "5 problem(s)" in msg
    assert f"{path}:line 5: invalid JSON" in msg
    assert f"{path}:line 6: missing key(s) suffix" in msg
    assert f"{path}:line 7: image file not found" in msg and "nope.png" in msg
    assert f"{path}:line 9: expected a JSON object" in msg
    assert f"{path}:line 10: key(s) prefix must be strings" in msg
    assert len(e.value.problems) == 5
    ds = load_jsonl(path, strict=False)  # skipped, but still reported
    assert len(ds) == 4 and [p.where for p in ds.problems] == ["line 5", "line 6", "line 7", "line 9", "line 10"]


def test_many_problems_listed_with_count(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("not json\n" * 25)
    with pytest.raises(DataError, match=r"25 problem\(s\)[\s\S]*and 15 more"):
        load_jsonl(path)


def _coco(tmp_path, anns, images=None, cats=None):
    write_images(tmp_path / "imgs")
    coco = {
        "images": images or [{"id": 1, "file_name": "imgs/red.png", "width": 200, "height": 100},
                             {"id": 2, "file_name": "imgs/blue.png", "width": 50, "height": 50}],
        "categories": cats or [{"id": 3, "name": "dog"}, {"id": 1, "name": "cat"}, {"id": 7, "name": "car"}],
        "annotations": anns,
    }
    p = tmp_path / "ann.json"
    p.write_text(json.dumps(coco))
    return p


def test_loc_tokens_rounding_and_clipping():
    assert box_tokens((0, 0, 200, 100), 200, 100) == "<loc0000><loc0000><loc1023><loc1023>"
    # y0 = 25/100*1024 = 256, x0 = 50/200*1024 = 256, y1 = 768, x1 = 100.1/200*1024 = 512.5 -> 513
    assert box_tokens((50, 25, 100.1, 75), 200, 100) == "<loc0256><loc0256><loc0768><loc0513>"


def test_coco_detection_targets(tmp_path):
    anns = [
        {"id": 10, "image_id": 1, "category_id": 3, "bbox": [50, 25, 50, 50]},
        {"id": 11, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 100]},
        {"id": 12, "image_id": 1, "category_id": 3, "bbox": [100, 0, 100, 10]},
        {"id": 13, "image_id": 2, "category_id": 7, "bbox": [0, 0, 25, 25]},
    ]
    ds = load_examples(_coco(tmp_path, anns))
    assert [e.prefix for e in ds] == ["detect cat ; dog", "detect car"]
    assert {e.task for e in ds} == {"detect"}  # so tasks=[detect] selects COCO examples too
    assert ds[0].suffix == ("<loc0000><loc0000><loc1023><loc1023> cat ; "
                            "<loc0256><loc0256><loc0768><loc0512> dog ; "
                            "<loc0000><loc0512><loc0102><loc1023> dog")
    assert ds[1].suffix == "<loc0000><loc0000><loc0512><loc0512> car"
    assert ds[0].image == str(tmp_path / "imgs" / "red.png")
    # absent classes listed -> empty answer for them; an image without boxes gets an empty suffix
    anns2 = [a for a in anns if a["image_id"] == 1]
    ds = load_coco(_coco(tmp_path, anns2), include_absent=True)
    assert [e.prefix for e in ds] == ["detect cat ; dog ; car", "detect cat ; dog ; car"]
    assert ds[1].suffix == ""


def test_coco_bad_boxes_reported(tmp_path):
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [150, 0, 60, 10]},  # x1 = 210 > 200
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 10, 0, 5]},  # zero area
        {"id": 3, "image_id": 9, "category_id": 3, "bbox": [1, 1, 2, 2]},  # unknown image
        {"id": 4, "image_id": 1, "category_id": 99, "bbox": [1, 1, 2, 2]},  # unknown class
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1, 1, 2, 2]},
    ]
    p = _coco(tmp_path, anns)
    with pytest.raises(DataError) as e:
        load_coco(p)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    assert f"{p}:annotation id=1: box [150, 0, 60, 10] lies outside the 200x100 image" in msg
    assert f"{p}:annotation id=2: zero-area box" in msg
    assert "annotation id=3: unknown image_id 9" in msg and "annotation id=4: unknown category_id 99" in msg
    ds = load_coco(p, strict=False)
    assert len(ds) == 1 and len(ds.problems) == 4


def test_coco_segmentation_targets(tmp_path):
    seen = []

    def fake_codec(mask, box):
        seen.append((mask.copy(), box))
        return list(range(16))

    anns = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [10, 20, 20, 10],
             "segmentation": [[10, 20, 30, 20, 30, 30, 10, 30]]}]
    ds = load_coco(_coco(tmp_path, anns), task="segment", mask_tokenizer=fake_codec)
    assert ds[0].prefix == "segment cat"
    seg = "".join(f"<seg{i:03d}>" for i in range(16))
    assert ds[0].suffix == f"<loc0410><loc0205><loc0614><loc0614>{seg} cat"
    mask, box = seen[0]
    assert mask.shape == (50, 50) and box == (10.0, 20.0, 30.0, 30.0)
    assert mask[25, 20] and not mask[5, 5] and 150 < mask.sum() < 300
    with pytest.raises(ValueError, match="mask codec"):
        load_coco(_coco(tmp_path, anns), task="segment")


@pytest.mark.parametrize("coco_tools", [True, False])
def test_segmentation_decoding(monkeypatch, coco_tools):
    import sys

    if coco_tools:
        import pycocotools  # noqa: F401 - a test dependency
    else:  # the dependency-free path: polygons with PIL, uncompressed RLE by hand
        monkeypatch.setitem(sys.modules, "pycocotools", None)
    rle = {"size": [3, 2], "counts": [1, 2, 3]}  # column-major: 0 | 1 1 | 0 0 0
    rle_mask = [[False, False], [True, False], [True, False]]
    assert decode_segmentation(rle, 3, 2).tolist() == rle_mask
    poly = decode_segmentation([[10, 20, 30, 20, 30, 30, 10, 30]], 50, 50)
    assert poly.dtype == bool and poly.shape == (50, 50)
    assert poly[21:29, 11:29].all() and not poly[:19].any() and not poly[:, :9].any()
    compressed = {"size": [3, 2], "counts": "123"}  # the same mask in COCO's string form: no pycocotools needed
    assert decode_segmentation(compressed, 3, 2).tolist() == rle_mask
    with pytest.raises(ValueError, match="end inside a number"):
        decode_segmentation({"size": [3, 2], "counts": "abc"}, 3, 2)


def test_coco_segment_with_real_codec_and_tokenizer(tmp_path):
    """COCO polygons -> `<loc>`x4 `<seg>`x16 targets through palikit's mask codec; the real tokenizer
    turns every location/segment token into one id."""
    from palikit.tasks.mask_codec import make_random_codec, tokens_from_mask
    from palikit.tokenizer import build_tokenizer

    codec = make_random_codec(0, embed_dim=16)
    codec.to_npz(tmp_path / "vae.npz")
    anns = [{"id": 1, "image_id": 2, "category_id": 1, "bbox": [10, 20, 20, 10],
             "segmentation": [[10, 20, 30, 20, 30, 30, 10, 30]]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [0, 0, 50, 50],
             "segmentation": {"size": [50, 50], "counts": [0, 2500]}}]
    ds = load_examples(_coco(tmp_path, anns), coco_task="segment", mask_codec=tmp_path / "vae.npz")
    ex = ds[0]
    assert ex.prefix == "segment cat ; dog"
    full = np.zeros((50, 50), bool)
    full[20:30, 10:30] = True
    codes = tokens_from_mask(codec, full, (10, 20, 30, 30))
    first = "<loc0410><loc0205><loc0614><loc0614>" + "".join(f"<seg{c:03d}>" for c in codes) + " cat"
    assert ex.suffix.startswith(first + " ; <loc0000><loc0000><loc1023><loc1023><seg")
    assert ex.suffix.endswith(" dog")
    tok = build_tokenizer(["segment", "cat", "dog", ";"], tmp_path / "tok")
    pt = tok.encode_prompt(ex.prefix, ex.suffix)
    suffix_ids = pt.ids[pt.prefix_len:]
    assert sum(tok.is_loc(i) for i in suffix_ids) == 8 and sum(tok.is_seg(i) for i in suffix_ids) == 32


def test_tasks_filter_selects_rows_by_task_field(tmp_path):
    """`tasks=[...]` (the demo recipe's reading warm-up) keeps only the listed JSONL rows, in order,
    for both training and validation data; a filter nothing matches is an error naming what exists."""
    from palikit.train.config import TrainConfig
    from palikit.train.data import select_tasks
    from palikit.train.trainer import Trainer
    from helpers.train import run_config, run_kwargs, setup_run

    setup_run(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    for row, task in zip(rows, ["caption", "ocr", "caption", "ocr"]):
        row["task"] = task
    tagged = tmp_path / "data" / "tagged.jsonl"
    tagged.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_jsonl(tagged)
    assert [ex.task for ex in ds] == ["caption", "ocr", "caption", "ocr"]

    cfg = run_config(tmp_path, train_data=str(tagged), val_data=str(tagged), tasks=["ocr"], batch_size=2, plot=False)
    trainer = Trainer(cfg, **run_kwargs())
    assert [ex.suffix for ex in trainer.train_set] == [rows[1]["suffix"], rows[3]["suffix"]]
    assert [ex.source for ex in trainer.val_set] == [f"{tagged}:2", f"{tagged}:4"]
    assert TrainConfig.from_dict({}, ["tasks=ocr,count"]).tasks == ["ocr", "count"]
    assert select_tasks(ds.examples, None, "x") == ds.examples

    with pytest.raises(DataError, match="no example has a task in \\['count'\\]; tasks found: caption, ocr"):
        select_tasks(ds.examples, ["count"], str(tagged))
    untagged = load_jsonl(tmp_path / "data" / "train.jsonl")
    with pytest.raises(DataError, match='rows need a "task" field'):
        select_tasks(untagged.examples, ["ocr"], "train.jsonl")
    (tmp_path / "data" / "bad.jsonl").write_text(json.dumps({**rows[0], "task": 3}) + "\n")
    with pytest.raises(DataError, match="line 1: key task must be a string"):
        load_jsonl(tmp_path / "data" / "bad.jsonl")
