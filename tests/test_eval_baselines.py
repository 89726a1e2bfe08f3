"""Baselines in `palikit eval`: the REAL Tesseract binary (pytesseract) and a REAL `palikit serve`
process (the bundled demo model) queried through the official `openai` client, run by the real CLI
on the generated scene-text set; the report's numbers are checked against what those systems return
for the same images. Also: a COCO results file as a detection baseline, an unreachable endpoint
(failed samples counted), bad specs refused with a clear message, and the scene-text generator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from lab.demo.scenetext import DOMAINS, write_set
from palikit.eval import evaluate_models
from palikit.eval.baselines import BaselineError, COCOResults, Tesseract, parse_baseline
from palikit.eval.metrics import ocr_accuracy

from serve_helpers import LAUNCH, free_port

pytestmark = pytest.mark.slow  # the real Tesseract binary and a real server process

KEY = "sk-eval-baseline-test-0123"
CLI = "import sys; from palikit.cli import main; from palikit.cli import evaluate; sys.exit(main(sys.argv[1:]))"


def _env(**extra) -> dict:
    import palikit

    src = str(Path(palikit.__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]), **extra}


@pytest.fixture(scope="module")
def demo_server():
    """`palikit serve` with no --model: the bundled demo model, on a free loopback port."""
    port = free_port()
    log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"palikit-eval-serve-{port}.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--torch-threads", "1", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=_env(PALIKIT_API_KEYS=KEY),
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, f"palikit serve exited with {proc.returncode}"
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "palikit serve not ready after 120 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def scenetext(tmp_path_factory):
    return write_set(tmp_path_factory.mktemp("scenetext"), n=10, seed=3)


def _rows(jsonl: Path) -> list[dict]:
    return [json.loads(x) for x in jsonl.read_text().splitlines()]


def test_scenetext_set_is_deterministic_with_every_domain(tmp_path):
    a, b = write_set(tmp_path / "a", n=10, seed=1), write_set(tmp_path / "b", n=10, seed=1)
    ra, rb = _rows(a), _rows(b)
    assert ra == rb and {r["domain"] for r in ra} == set(DOMAINS)
    assert len({r["font"] for r in ra}) >= 3 and len({r["suffix"] for r in ra}) == 10
    for r in ra:
        pa, pb = np.asarray(Image.open(a.parent / r["image"])), np.asarray(Image.open(b.parent / r["image"]))
        assert pa.shape == pb.shape and (pa == pb).all() and pa.shape[0] >= 8 and pa.shape[1] > pa.shape[0]
    other = _rows(write_set(tmp_path / "c", n=10, seed=2))
    assert [r["suffix"] for r in other] != [r["suffix"] for r in ra]


def test_cli_demo_vs_tesseract_vs_served_demo_one_report(scenetext, demo_server, tmp_path):
    """The real CLI: model + Tesseract + the demo model behind `palikit serve` via the openai client."""
    out = tmp_path / "cmp"
    spec = f"openai:{demo_server}/v1#demo?key_env=EVAL_TEST_KEY&prompts=paligemma&concurrency=2&price_in=2&price_out=8"
    run = subprocess.run([sys.executable, "-c", CLI, "eval", str(scenetext), "--task", "ocr", "--device", "cpu",
                          "--baseline", "tesseract", "--baseline", spec, "--out", str(out), "--price-per-hour", "0.5",
                          "--batch-size", "4"], capture_output=True, text=True, env=_env(EVAL_TEST_KEY=KEY),
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    by = {m["model"]: m for m in rep["models"]}
    assert list(by) == ["demo", "tesseract", "demo (openai API)"]
    rows = _rows(scenetext)

    # Tesseract: the report's per-sample texts are what pytesseract returns for the same images
    import pytesseract

    tess = by["tesseract"]
    assert tess["settings"]["psm"] == 7 and "--psm 7" in tess["settings"]["config"]
    for r, ps in zip(rows, tess["per_sample"]):
        raw = pytesseract.image_to_string(Image.open(scenetext.parent / r["image"]).convert("RGB"), lang="eng",
                                          config="--psm 7")
        assert ps["text"] == " ".join(x.strip() for x in raw.splitlines() if x.strip())
        assert ps["score"] == pytest.approx(ocr_accuracy(ps["text"], r["suffix"], normalize=True))
    assert tess["score"] == pytest.approx(100 * np.mean([p["score"] for p in tess["per_sample"]]))

    # the served demo model answers like the demo model in this process, and its usage gives the cost
    from palikit.api import PaliGemma
    from palikit.assets import DEMO_MODEL_DIR

    pg = PaliGemma.from_pretrained(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    local = [r.text for r in pg.predict_batch([str(scenetext.parent / r["image"]) for r in rows], ["ocr"] * len(rows),
                                              max_new_tokens=64)]
    served = by["demo (openai API)"]
    assert [p["text"] for p in served["per_sample"]] == local == [p["text"] for p in by["demo"]["per_sample"]]
    assert served["failed"] == 0 and served["cost"]["samples_with_usage"] == len(rows)
    pt, ct = served["cost"]["prompt_tokens_mean"], served["cost"]["completion_tokens_mean"]
    assert pt > 0 and served["cost"]["cost_per_sample"] == pytest.approx((pt * 2 + ct * 8) / 1e6)
    preds = _rows(out / "baselines" / "demo_openai_API" / "predictions.jsonl")
    assert all(p["usage"]["prompt_tokens"] > 0 for p in preds)

    # one report: a row per model, domains, devices, formulas next to the numbers, three charts
    assert [c["model"] for c in rep["comparison"]] == list(by)
    for m in rep["models"]:
        assert m["speed"]["median_s"] > 0 and m["hardware"]["device"]
        assert {f"accuracy/domain/{d}" for d in DOMAINS} <= set(m["metrics"])
        assert m["speed_efficiency"] == pytest.approx(m["score"] / m["speed"]["median_s"])
    assert by["demo"]["cost"]["cost_per_sample"] == pytest.approx(0.5 * by["demo"]["speed"]["mean_s"] / 3600)
    md = (out / "report.md").read_text()
    assert "accuracy % / median s per image" in md and "remote endpoint" in md and "psm" in md
    assert f"{tess['score']:.2f}" in md
    for name in ("accuracy", "speed_efficiency", "cost_efficiency"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG"
    assert "tesseract: ocr accuracy" in run.stdout and "%" in run.stdout

    # resumable per model: a second run predicts nothing again and gives the same numbers
    again = subprocess.run([sys.executable, "-c", CLI, "eval", str(scenetext), "--task", "ocr", "--device", "cpu",
                            "--baseline", "tesseract", "--baseline", spec, "--out", str(out), "--price-per-hour",
                            "0.5"], capture_output=True, text=True, env=_env(EVAL_TEST_KEY=KEY), timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    rep2 = json.loads((out / "report.json").read_text())
    assert [m["predicted_now"] for m in rep2["models"]] == [0, 0, 0]
    assert [m["score"] for m in rep2["models"]] == [m["score"] for m in rep["models"]]


def test_unreachable_endpoint_fails_samples_and_counts_them(scenetext, tmp_path):
    dead = parse_baseline(f"openai:http://127.0.0.1:{free_port()}/v1#gpt-x?retries=1&timeout=5")
    cmp = evaluate_models([Tesseract(), dead], scenetext, "ocr", out_dir=tmp_path / "dead", progress=False,
                          charts=False, limit=3)
    bad = cmp.reports[1]
    assert bad.n == 3 and bad.failed == 3 and bad.score == 0.0 and "Connection" in bad.failures[0]["error"]
    assert bad.speed == {} and cmp.reports[0].failed == 0
    assert "3 failed" in (tmp_path / "dead" / "baselines" / "gpt-x_openai_API" / "report.md").read_text()


def test_chat_prompts_reach_the_endpoint(scenetext, demo_server, tmp_path, monkeypatch):
    """`prompts=chat` (the default) sends an instruction; the served model receives it as its prompt."""
    monkeypatch.setenv("EVAL_TEST_KEY", KEY)
    chat = parse_baseline(f"openai:{demo_server}/v1#demo?key_env=EVAL_TEST_KEY")
    cmp = evaluate_models([Tesseract(), chat], scenetext, "ocr", out_dir=tmp_path / "chat", progress=False,
                          charts=False, limit=2)
    recs = _rows(tmp_path / "chat" / "baselines" / "demo_openai_API" / "predictions.jsonl")
    assert recs[0]["prompt"].startswith("Read the text in this image") and cmp.reports[1].failed == 0


def test_caption_through_the_openai_adapter_matches_the_model(demo_server, tmp_path, monkeypatch):
    """Caption (CIDEr) via the served demo model with PaliGemma prompts equals the in-process model."""
    from lab.demo.evaluate import split_by_task
    from palikit.demo.splits import write_split
    from palikit.api import PaliGemma
    from palikit.assets import DEMO_MODEL_DIR
    from palikit.demo import shapes

    d = write_split(shapes, tmp_path / "shapes", "test", 4, 112, seg_fn=lambda s: [0] * 16)
    caps = split_by_task(d / "test.jsonl", tmp_path / "splits")["caption"]
    monkeypatch.setenv("EVAL_TEST_KEY", KEY)
    served = parse_baseline(f"openai:{demo_server}/v1#demo?key_env=EVAL_TEST_KEY&prompts=paligemma")
    pg = PaliGemma.from_pretrained(DEMO_MODEL_DIR, device="cpu", dtype="float32")
    cmp = evaluate_models([pg, served], caps, "caption", out_dir=tmp_path / "cap", progress=False, charts=False)
    local, remote = cmp.reports
    assert [p["text"] for p in remote.per_sample] == [p["text"] for p in local.per_sample]
    assert remote.metrics["cider"] == pytest.approx(local.metrics["cider"]) and remote.prompt == local.prompt
    with pytest.raises(BaselineError, match="no chat prompt for detect"):
        parse_baseline(f"openai:{demo_server}/v1#demo?key_env=EVAL_TEST_KEY").prompt_template("detect")


def _coco(tmp_path: Path) -> Path:
    for i in (1, 2):
        Image.new("RGB", (64, 48), "white").save(tmp_path / f"{i}.png")
    gt = {"images": [{"id": i, "file_name": f"{i}.png", "width": 64, "height": 48} for i in (1, 2)],
          "categories": [{"id": 1, "name": "star"}, {"id": 2, "name": "cross"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                          {"id": 2, "image_id": 2, "category_id": 2, "bbox": [30, 10, 16, 16], "area": 256,
                           "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    return tmp_path / "gt.json"


def test_coco_results_file_as_detection_baseline(tmp_path):
    gt = _coco(tmp_path)
    perfect = tmp_path / "perfect.json"
    perfect.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "score": 0.9},
                                   {"image_id": 2, "category_id": 2, "bbox": [30, 10, 16, 16], "score": 0.8}]))
    shifted = tmp_path / "shifted.json"
    shifted.write_text(json.dumps([{"image_id": 1, "category_id": 1, "bbox": [40, 20, 20, 20], "score": 0.9}]))
    cmp = evaluate_models([COCOResults(perfect), parse_baseline(f"coco-results:{shifted}")], gt, "detect",
                          out_dir=tmp_path / "det", progress=False)
    assert cmp.reports[0].metrics["map50"] == pytest.approx(1.0) and cmp.reports[1].metrics["map50"] == 0.0
    assert cmp.reports[0].speed == {} and cmp.reports[0].hardware["device"].startswith("precomputed")
    (tmp_path / "1.png").unlink()  # a results file needs no image files
    again = evaluate_models([COCOResults(perfect)], gt, "detect", out_dir=tmp_path / "det2", progress=False,
                            charts=False)
    assert again.reports[0].failed == 0
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"image_id": 1, "category_id": 7, "bbox": [4, 4, 20, 20], "score": 0.9}]))
    with pytest.raises(BaselineError, match=r"category ids \[7\]"):
        evaluate_models([COCOResults(wrong)], gt, "detect", out_dir=tmp_path / "det3", progress=False)


@pytest.mark.parametrize("spec, msg", [
    ("tesseract?psm=x", "psm='x' must be a int"), ("tesseract?speed=9", "unknown option 'speed'"),
    ("openai:127.0.0.1:8000/v1#m", "must start with http"), ("openai:http://h/v1", "openai:BASE_URL#MODEL"),
    ("openai:http://h/v1#m?key_env=NOT_SET_ANYWHERE_42", "NOT_SET_ANYWHERE_42"), ("paddleocr", "unknown baseline"),
    ("tesseract?lang=klingon", "no 'klingon' language data"),
])
def test_bad_baseline_specs_say_what_to_write(spec, msg):
    with pytest.raises(BaselineError, match=msg.replace("?", r"\?").replace("[", r"\[")):
        parse_baseline(spec)


def test_tesseract_refuses_other_tasks(scenetext, tmp_path):
    with pytest.raises(BaselineError, match="--task ocr"):
        evaluate_models([Tesseract(), Tesseract()], scenetext, "caption", out_dir=tmp_path / "x", progress=False)


def test_every_scenetext_font_draws_every_letter_and_digit():
    """A face without glyphs (matplotlib's DejaVuSansDisplay) drew blank crops labelled with text."""
    import string

    from PIL import ImageFont

    from palikit.demo.fonts import font_files

    names = set()
    for path in font_files():
        font = ImageFont.truetype(str(path), 24)
        assert all(font.getmask(c).getbbox() for c in string.ascii_letters + string.digits), path.name
        names.add(path.name)
    assert "DejaVuSansDisplay.ttf" not in names and len(names) >= 5
