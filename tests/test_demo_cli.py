"""`palikit demo` judges detect and segment answers against the generator's ground truth by IoU
(label and box IoU >= 0.5, or mask IoU >= 0.5, matched one-to-one), not by labels alone: a box in the
wrong grid cell with the right label is a miss, the same box in the right cell a hit, and the
summary line says which rule was used. The planted answers are built from the generator's own
shapes (moved one grid cell for the wrong ones), never typed in. `palikit demo` runs every task and
writes annotated PNGs; without `--model` the CLI uses the bundled model and says so in one line (or
says clearly that none is bundled)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from palikit.api import PaliGemma
from palikit.cli import main
from palikit.cli.demo import demo_prompts, judge_row
from palikit.eval.instances import judge_instances
from palikit.demo.shapes import GRID, make_sample
from palikit.tasks.parse import Detection
from palikit.testing import make_tiny_checkpoint

SEED = 2_000_003  # the demo's test split


def _det(shape, dx: float = 0.0, mask=None) -> Detection:
    x0, y0, x1, y1 = shape.box
    return Detection(label=shape.cls, box=(x0 + dx, y0, x1 + dx, y1), loc=(0, 0, 1, 1), score=0.9, mask=mask)


def _moved(shape, cells: int, size: int):
    """The shape's box and mask moved `cells` grid cells sideways (right, or left when at the right edge)."""
    step = size // GRID * cells
    if shape.box[2] + step > size:
        step = -step
    return step, np.roll(shape.mask, step, axis=1)


@pytest.fixture(scope="module")
def sample():
    s = make_sample(0, seed=SEED, size=112)
    assert len(s.shapes) >= 2
    return s


def test_a_box_in_the_wrong_cell_is_a_miss_and_the_right_one_a_hit(sample):
    truth = sample.shapes
    right = [_det(s) for s in truth]
    v = judge_instances(right, truth)
    assert v.ok and v.matched == [True] * len(truth) and v.missed == 0 and v.ious == pytest.approx([1.0] * len(truth))
    step, _ = _moved(truth[0], 1, 112)
    wrong = [_det(truth[0], dx=step)] + right[1:]  # same labels as the truth, one box a cell off
    v = judge_instances(wrong, truth)
    assert not v.ok and v.matched[0] is False and v.missed == 1 and v.ious[0] < 0.5
    assert v.matched[1:] == [True] * (len(truth) - 1)
    # the labels alone would have passed it
    assert sorted(d.label for d in wrong) == sorted(s.cls for s in truth)


def test_matching_is_one_to_one_and_needs_the_label(sample):
    truth = sample.shapes[:1]
    twice = [_det(truth[0]), _det(truth[0])]
    v = judge_instances(twice, truth)
    assert not v.ok and v.matched.count(True) == 1 and v.missed == 0
    relabelled = [Detection(label="not-" + truth[0].cls, box=truth[0].box, loc=(0, 0, 1, 1))]
    v = judge_instances(relabelled, truth)
    assert not v.ok and v.missed == 1 and v.ious == [0.0]
    assert judge_instances([], []).ok and not judge_instances([], truth).ok
    with pytest.raises(ValueError, match="box.*mask"):
        judge_instances([], [], by="area")


def test_masks_are_judged_by_mask_iou(sample):
    truth = sample.shapes
    right = [_det(s, mask=s.mask) for s in truth]
    assert judge_instances(right, truth, by="mask").ok
    _, moved = _moved(truth[0], 1, 112)
    wrong = [_det(truth[0], mask=moved)] + right[1:]  # the right box, the mask a cell off
    v = judge_instances(wrong, truth, by="mask")
    assert not v.ok and v.matched[0] is False and v.ious[0] < 0.5
    assert judge_instances(wrong, truth, by="box").ok  # box IoU alone would not see it
    no_mask = [_det(s) for s in truth]
    assert not judge_instances(no_mask, truth, by="mask").ok


def test_the_row_prints_each_boxs_iou(sample):
    rows = {task: (expected, truth) for task, _, expected, truth in demo_prompts(sample)}
    expected, truth = rows["detect"]
    step, _ = _moved(truth[0], 1, 112)
    dets = [_det(truth[0], dx=step)] + [_det(s) for s in truth[1:]]
    ok, cell = judge_row("detect", SimpleNamespace(text="", detections=dets), expected, truth)
    assert not ok and cell.count("IoU") == len(dets) and "MISS" in cell and "1 expected not found" in cell
    ok, cell = judge_row("detect", SimpleNamespace(text="", detections=[_det(s) for s in truth]), expected, truth)
    assert ok and "MISS" not in cell and cell.count("IoU 1.00") == len(truth)
    text_expected = rows["caption"][0]
    assert judge_row("caption", SimpleNamespace(text=text_expected, detections=[]), text_expected, [])[0]


def test_palikit_demo_counts_a_planted_wrong_cell_box_as_a_miss(tmp_path, capsys, monkeypatch):
    """The whole command on a real (tiny) checkpoint, with the model's answers replaced by the truth
    except one detect box of image 0, moved one cell: the summary counts exactly that answer wrong."""
    model = make_tiny_checkpoint(tmp_path / "ckpt", family="pg2", image_size=112)

    def fake_predict_batch(self, images, prompts, **_):
        index = int(re.search(r"example(\d+)\.png$", str(images[0])).group(1))
        sample = make_sample(index, seed=SEED, size=112)
        rows = {p: (task, expected, truth) for task, p, expected, truth in demo_prompts(sample)}
        out = []
        for prompt in prompts:
            task, expected, truth = rows[prompt]
            dets = [_det(s, mask=s.mask if task == "segment" else None) for s in truth]
            if task == "detect" and index == 0:
                step, _ = _moved(truth[0], 1, 112)
                dets[0] = _det(truth[0], dx=step)
            out.append(SimpleNamespace(text=expected if task not in ("detect", "segment") else "", detections=dets))
        return out

    monkeypatch.setattr(PaliGemma, "predict_batch", fake_predict_batch)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "3", "--model", str(model)]) == 0
    text = capsys.readouterr().out
    total = sum(len(demo_prompts(make_sample(i, seed=SEED, size=112))) for i in range(3))
    summary = next(line for line in text.splitlines() if "answers as expected" in line)
    assert summary.startswith(f"{total - 1}/{total} answers as expected"), summary
    assert "detect 2/3" in summary and "segment 3/3" in summary
    flat = " ".join(text.split())  # rich wraps long lines
    assert "box IoU >= 0.5" in flat and "mask IoU >= 0.5" in flat and "one-to-one" in flat
    assert "MISS" in flat and "IoU 1.00" in flat
    assert (out / "example0-detect.png").is_file()


def test_cli_without_model_uses_the_bundled_model_and_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    from palikit import assets

    image = tmp_path / "x.png"
    make_sample(0, seed=SEED).image.save(image)
    bundled = make_tiny_checkpoint(tmp_path / "bundled", family="pg2", image_size=112)  # stands in for the real one
    monkeypatch.setattr(assets, "bundled_demo_model", lambda: bundled)
    assert main(["caption", str(image), "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    notice = [line for line in captured.err.splitlines() if "bundled demo model" in line]
    assert len(notice) == 1 and "--model google/paligemma2-3b-mix-224" in notice[0], captured.err
    assert captured.out.strip()

    monkeypatch.setattr(assets, "bundled_demo_model", lambda: None)
    assert main(["caption", str(image)]) != 0
    err = capsys.readouterr().err
    assert "no bundled demo model" in err and "--model" in err and "Traceback" not in err


def test_demo_command_runs_every_task_and_writes_annotated_pngs(tmp_path, capsys):
    model = make_tiny_checkpoint(tmp_path / "ckpt", family="pg2", image_size=112)
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--images", "2", "--model", str(model)]) == 0
    text = capsys.readouterr().out
    for task in ("caption", "detect", "segment", "count", "color"):
        assert task in text
    assert "answers as expected" in text and "a " in text  # expected captions are printed
    for i in range(2):
        assert (out / f"example{i}.png").is_file()
        assert (out / f"example{i}-detect.png").is_file() and (out / f"example{i}-segment.png").is_file()
