"""`palikit eval --sensitivity` (issue 37): case and separator variants of the task's prompt beside its
wordings, user-given variants (`--variant`), progress bars named after each variant, the sweep linked
from report.md, and charts whose axis names the task's metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from palikit.eval import prompt_variants
from palikit.eval.prompts_variants import parse_user_variants, variant_kind
from palikit.eval.report import chart_labels


@pytest.mark.parametrize("task, expected", [
    ("ocr", {"case-capitalised": "Ocr", "case-upper": "OCR"}),
    ("caption", {"case-capitalised": "Caption {lang}", "case-upper": "CAPTION {lang}"}),
    ("vqa", {"case-capitalised": "Answer {lang} {question}", "case-upper": "ANSWER {lang} {question}"}),
    ("anls", {}),  # the raw question: no keyword to change
    ("detect", {"case-capitalised": "Detect {labels}", "case-upper": "DETECT {labels_upper}",
                "case-labels": "detect {labels_title}", "sep-comma": "detect {labels_comma}",
                "sep-and": "detect {labels_and}", "sep-tight": "detect {labels_tight}"}),
    ("segment", {"case-capitalised": "Segment {labels}", "case-upper": "SEGMENT {labels_upper}",
                 "case-labels": "segment {labels_title}", "sep-comma": "segment {labels_comma}",
                 "sep-and": "segment {labels_and}", "sep-tight": "segment {labels_tight}"}),
])
def test_case_and_separator_variants_of_the_task_prompt(task, expected):
    sweep = prompt_variants(task, case=True, separators=True, default=True)
    generated = {k: v for k, v in sweep.items() if variant_kind(k) in ("case", "separator")}
    assert generated == expected
    assert next(iter(sweep)) == "default" and variant_kind("default") == "default"
    assert set(prompt_variants(task).values()) <= set(sweep.values())  # the wordings too (a template runs once)
    assert len(set(sweep.values())) == len(sweep)


def test_user_variants_are_named_checked_and_not_run_twice():
    assert parse_user_variants(["find {labels}", "obj=detect the {labels}"]) == {
        "user1": "find {labels}", "user-obj": "detect the {labels}"}
    with pytest.raises(ValueError, match=r"uses \{label\}, which is not a field; the fields are .*\{labels\}"):
        parse_user_variants(["detect {label}"])
    with pytest.raises(ValueError, match="no prompt template"):
        parse_user_variants(["x="])
    sweep = prompt_variants("detect", default=True, user={"user1": "detect {labels}", "user2": "spot {labels}"})
    assert "user1" not in sweep and sweep["user2"] == "spot {labels}"  # the default's template runs once


def test_the_score_axis_names_the_metric():
    assert chart_labels("map")["accuracy"] == "Score (map x100)"
    assert chart_labels("accuracy")["accuracy"] == "Accuracy (score, %)"


class Detector:
    """Boxes every requested label at (2, 2, 12, 12) when the prompt starts with "detect"."""

    name = "detector"

    def predict_batch(self, images, prompts, labels=None, **opts):
        return [{"text": p, "detections": [{"label": lab, "box": [2, 2, 12, 12], "score": 0.9} for lab in ls]
                 if p.startswith("detect") else []} for p, ls in zip(prompts, labels)]


def test_cli_sensitivity_named_progress_linked_report_and_user_variants(tmp_path, monkeypatch, capsys):
    import palikit.cli.predict
    import palikit.eval.report as report_module
    from palikit.cli import main

    monkeypatch.setattr(palikit.cli.predict, "load_model", lambda *a, **k: Detector())
    axes = []
    real_bar_chart = report_module.bar_chart
    monkeypatch.setattr(report_module, "bar_chart", lambda *a, **k: axes.append(k["xlabel"]) or real_bar_chart(*a, **k))
    gt = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "ring"}, {"id": 2, "name": "gem"}]}
    for i in (1, 2):
        Image.new("RGB", (32, 32), "white").save(tmp_path / f"{i}.png")
        gt["images"].append({"id": i, "file_name": f"{i}.png", "width": 32, "height": 32})
        gt["annotations"].append({"id": i, "image_id": i, "category_id": i, "bbox": [2, 2, 10, 10], "area": 100,
                                  "iscrowd": 0})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    out = tmp_path / "out"
    code = main(["eval", str(tmp_path / "gt.json"), "--task", "detect", "--device", "cpu", "--out", str(out),
                 "--variant", "find {labels}", "--variant", "dt=detect the {labels}"])  # --variant: a sweep
    err = capsys.readouterr().err
    assert code == 0, err
    assert "sensitivity 1/12 default (detect {labels}): 2/2 (100%)" in err  # main: every bar read "eval demo"
    assert "sensitivity 12/12 user-dt (detect the {labels}): 2/2" in err
    sens = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert sens["scores"]["user1"] == 0.0 and sens["scores"]["user-dt"] == pytest.approx(100.0)
    assert sens["kinds"]["sep-tight"] == "separator" and sens["spread"] == pytest.approx(100.0)
    md = (out / "report.md").read_text()
    assert "## Prompt sensitivity" in md and "[sensitivity/sensitivity.md](sensitivity/sensitivity.md)" in md
    assert "![prompt sensitivity](sensitivity/sensitivity.png)" in md
    assert json.loads((out / "report.json").read_text())["sensitivity"]["spread"] == pytest.approx(100.0)
    assert "map x100 (score)" in axes and "Accuracy (score, %)" not in axes  # main: "Accuracy" for a mAP
    assert Path(out / "sensitivity" / "sensitivity.png").is_file()
    # the section is replaced, not added twice, when the same command runs again
    assert main(["eval", str(tmp_path / "gt.json"), "--task", "detect", "--device", "cpu", "--out", str(out),
                 "--sensitivity", "--no-progress"]) == 0
    assert (out / "report.md").read_text().count("## Prompt sensitivity") == 1

    with pytest.raises(SystemExit) as e:  # a bad template is refused before the model loads
        main(["eval", str(tmp_path / "gt.json"), "--task", "detect", "--out", str(out), "--variant", "detect {x}"])
    assert e.value.code == 2 and "uses {x}, which is not a field" in capsys.readouterr().err
