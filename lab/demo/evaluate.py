"""The demo model's scorecard, measured with `palikit.eval` on the shapes test split: detection
mAP@0.5 and segmentation mIoU on the COCO ground truth, exact match for OCR, counting, colour and
captions. Prints a Markdown table (the README's) and writes each task's report under `out`.
Version 2 (issue 19, `--version 2`) adds mAP@[.5:.95], stricter text targets, referring expressions
(accuracy: the one expected box at IoU >= 0.5, or nothing when nothing matches) and the hand-made
images of `lab/data/handmade` (drawn by another routine than the generator): an image counts when
every object is found at box IoU >= 0.5, one-to-one, nothing extra (`eval.instances`).

    python -m lab.demo.evaluate --model work/demo/anneal/final --data work/demo/data --out work/demo/eval
    python -m lab.demo.evaluate --version 2 --model work/demo2/run/final --data work/demo2/data --out work/demo2/eval
    python -m lab.demo.evaluate ... --install    # + copy it into src/palikit/assets/demo-model

`--install` ships the model only when every target is met (`--force` overrides): the checkpoint files,
its codec and tokenizer, plus `scorecard.json` and a model card with the table. It writes into the
package only in a source checkout (`src/palikit/assets/demo-model`); with palikit installed from a
wheel (site-packages) it refuses and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from palikit.assets import DEMO_MODEL_DIR
from palikit.fileio import atomic_dir

from .paths import CHECKOUT, check_install_dest, default_build_dir

TARGETS = {"detect": ("map50", 0.7), "segment": ("miou", 0.6), "ocr": ("exact_match", 0.8),
           "count": ("accuracy", 0.8), "color": ("exact_match", 0.8), "caption": ("exact_match", 0.7)}
# v2 (issue 19): (task, metric, target) rows; "handmade" is `handmade_score`, "refer_detect" `refer_score`
TARGETS_V2 = (("detect", "map50", 0.7), ("detect", "map", 0.4), ("segment", "miou", 0.6),
              ("ocr", "exact_match", 0.9), ("count", "accuracy", 0.9), ("color", "exact_match", 0.9),
              ("caption", "exact_match", 0.7), ("handmade", "images_ok", 16))
REPORTED_V2 = (("refer_detect", "accuracy"), ("refer_segment", "miou"), ("handmade", "map50"))  # no target
JSONL_METRIC_TASK = {"ocr": "exact", "count": "count", "color": "exact", "caption": "exact"}
HANDMADE = CHECKOUT / "lab" / "data" / "handmade"  # lab/demo/handmade.py draws them


def target_rows(version: int = 1) -> tuple[tuple[str, str, float], ...]:
    return TARGETS_V2 if version == 2 else tuple((t, m, v) for t, (m, v) in TARGETS.items())


def split_by_task(test_jsonl: Path, out: Path) -> dict[str, Path]:
    rows: dict[str, list[str]] = {}
    for line in test_jsonl.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            row["image"] = str((test_jsonl.parent / row["image"]).resolve())
            rows.setdefault(row["task"], []).append(json.dumps(row))
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for task, lines in rows.items():
        files[task] = out / f"test_{task}.jsonl"
        files[task].write_text("\n".join(lines) + "\n")
    return files


def _rows(path: Path, limit: int | None) -> list[dict]:
    from palikit.datafiles import read_jsonl_rows

    rows = [row for _, row in read_jsonl_rows(path)[0]]
    return rows[:limit] if limit else rows


def refer_score(model, detect_jsonl: Path, segment_jsonl: Path | None = None, *, limit: int | None = None,
                batch_size: int = 16) -> dict:
    """Referring expressions ("detect the red circle"): a detect row is right when the answer is the
    one expected box at IoU >= 0.5 with the expression as label, or nothing when no instance matches
    (`box` null); segment rows give the mIoU of the first mask with the expected one."""
    from palikit.eval.instances import Expected, judge_instances
    from palikit.eval.metrics_detection import segmentation_sample_iou
    from palikit.tasks.rle import rle_to_mask

    out: dict = {}
    rows = _rows(detect_jsonl, limit)
    labels = [r["prefix"].split(" ", 1)[1] for r in rows]
    answers = model.predict_batch([r["image"] for r in rows], [r["prefix"] for r in rows], batch_size=batch_size,
                                  labels=[[x] for x in labels], max_new_tokens=48)
    ok = [judge_instances(a.detections, [Expected(lab, r["box"])] if r["box"] else []).ok
          for r, a, lab in zip(rows, answers, labels)]
    out["refer_detect"] = {"accuracy": sum(ok) / max(len(ok), 1), "n": len(ok)}
    if segment_jsonl is not None and segment_jsonl.exists():
        rows = _rows(segment_jsonl, limit)
        answers = model.predict_batch([r["image"] for r in rows], [r["prefix"] for r in rows], batch_size=batch_size,
                                      labels=[[r["label"]] for r in rows], max_new_tokens=48)
        ious = [segmentation_sample_iou(a.detections, rle_to_mask(r["mask"]).astype(bool)) for r, a in zip(rows, answers)]
        out["refer_segment"] = {"miou": float(sum(ious) / max(len(ious), 1)), "n": len(ious)}
    return out


def handmade_score(model, folder: str | Path = HANDMADE, out: str | Path | None = None, *,
                   batch_size: int = 16, coco: bool = True) -> dict:
    """The hand-made images (`truth.json`): "detect" with the classes each image holds (as a user
    would ask); an image is right when every object is found at box IoU >= 0.5, one-to-one, with no
    extra box. Also COCO mAP@0.5 of the same answers against `coco.json`. Per-image verdicts go to
    `out/handmade.json`."""
    from palikit.eval.instances import Expected, judge_instances
    from palikit.eval.metrics_detection import coco_map
    from palikit.tasks.records import coco_results
    from palikit.demo.shapes2 import ALL_CLASSES

    folder = Path(folder)
    truth = json.loads((folder / "truth.json").read_text())
    classes = [sorted({o["label"] for o in t["objects"]}, key=ALL_CLASSES.index) for t in truth]
    answers = model.predict_batch([str(folder / t["image"]) for t in truth], ["detect " + " ; ".join(c) for c in classes],
                                  batch_size=batch_size, labels=classes, max_new_tokens=64)
    per_image = []
    for t, a in zip(truth, answers):
        v = judge_instances(a.detections, [Expected(o["label"], o["box"]) for o in t["objects"]])
        per_image.append({"image": t["image"], "ok": v.ok, "objects": len(t["objects"]), "missed": v.missed,
                          "extra": v.matched.count(False), "answer": a.text})
    result = {"images_ok": sum(r["ok"] for r in per_image), "images": len(per_image),
              "objects_found": sum(r["objects"] - r["missed"] for r in per_image),
              "objects": sum(r["objects"] for r in per_image)}
    if coco and (folder / "coco.json").exists():
        gt = json.loads((folder / "coco.json").read_text())
        ids = {im["file_name"]: im["id"] for im in gt["images"]}
        cats = {c["name"]: c["id"] for c in gt["categories"]}
        dets = [d for t, a in zip(truth, answers) for d in coco_results(ids[t["image"]], a.detections, cats, masks="none")]
        scores = coco_map(gt, dets)
        result["map50"], result["map"] = scores["map50"], scores["map"]
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "handmade.json").write_text(json.dumps({**result, "per_image": per_image}, indent=2) + "\n")
    return result


def scorecard(model, data: str | Path, out: str | Path, *, limit: int | None = None, batch_size: int = 16,
              version: int = 1) -> dict:
    from palikit.eval import evaluate, load_coco

    data, out = Path(data), Path(out)
    files = split_by_task(data / "test.jsonl", out / "splits")
    results = {}
    long = version == 2  # up to 6 instances: 6 x (4 <loc> + label), 6 x (4 + 16 <seg> + label)
    for task, metric_task in JSONL_METRIC_TASK.items():
        rep = evaluate(model, files[task], metric_task, out_dir=out / task, limit=limit, batch_size=batch_size,
                       progress=False, charts=False, predict_options={"max_new_tokens": 32})
        results[task] = rep.metrics
    for task in ("detect", "segment"):
        ds = load_coco(data / "test_coco.json", task, image_root=data)
        rep = evaluate(model, ds, task, out_dir=out / task, limit=limit, batch_size=batch_size, progress=False,
                       charts=False, predict_options={"max_new_tokens": (64 if task == "detect" else 96) * (2 if long else 1)})
        results[task] = rep.metrics
    if version == 2:
        results.update(refer_score(model, files["refer_detect"], files.get("refer_segment"), limit=limit,
                                   batch_size=batch_size))
        if (HANDMADE / "truth.json").exists():
            results["handmade"] = handmade_score(model, HANDMADE, out, batch_size=batch_size)
    return results


def markdown(results: dict, version: int = 1) -> str:
    lines = ["| task | metric | demo model | target | met |", "|---|---|---|---|---|"]
    rows = [(t, m, v) for t, m, v in target_rows(version)] + ([(t, m, None) for t, m in REPORTED_V2] if version == 2 else [])
    for task, metric, target in rows:
        value = results.get(task, {}).get(metric)
        shown = "n/a" if value is None else (f"{value}" if isinstance(value, int) else f"{value:.3f}")
        met = "" if target is None else ("yes" if value is not None and value >= target else "**no**")
        lines.append(f"| {task} | {metric} | {shown} | {'' if target is None else f'>= {target}'} | {met} |")
    return "\n".join(lines)


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "preprocessor_config.json", "vae-oid.npz")
OPTIONAL_FILES = ("generation_config.json",)


def numeric(results: dict) -> dict:
    """Each task's numeric metrics (what goes into JSON; per-sample lists left out)."""
    return {task: {m: v for m, v in r.items() if isinstance(v, (int, float))} for task, r in results.items()}


def target_keys(version: int = 1) -> list[tuple[str, str, str, float]]:
    """(key, task, metric, target) per target row; the key is the task, or "task metric" for a task
    with several targets (v2's detect: map50 and map). `missed_targets` and scorecard.json use it."""
    rows = target_rows(version)
    many = {t for t, _, _ in rows if sum(r[0] == t for r in rows) > 1}
    return [(f"{t} {m}" if t in many else t, t, m, v) for t, m, v in rows]


def missed_targets(results: dict, version: int = 1) -> dict[str, tuple[float, float]]:
    """{key: (value, target)} for every target missed (`target_keys`)."""
    return {key: (results.get(task, {}).get(metric, float("nan")), target)
            for key, task, metric, target in target_keys(version)
            if not results.get(task, {}).get(metric, float("-inf")) >= target}


MODEL_CARD = {
    1: "# palikit demo model\n\nA 3.5M-parameter PaliGemma 2-architecture model trained on the synthetic \"shapes\" "
       "data set (`python -m lab.demo.build`) by three recipes in turn: `lab/recipes/demo-ocr-warmup.yaml`, "
       "`lab/recipes/demo.yaml`, `lab/recipes/demo-anneal.yaml` (`make demo-model`). It only knows that world: for real "
       "images use `--model google/paligemma2-3b-mix-224` or a local checkpoint.\n\n",
    2: "# palikit demo model (v2)\n\nA 3.5M-parameter PaliGemma 2-architecture model (224 px, patch 28) started "
       "from the v1 demo model and trained on the synthetic \"shapes v2\" data set (`python -m lab.demo.build "
       "--version 2 --warm-start ...`: six classes at free positions, sizes and aspect ratios, textured backgrounds, "
       "words in many fonts, referring expressions) by `lab/recipes/demo-v2.yaml` (`make demo-model-v2`). It only knows "
       "that world: for real images use `--model google/paligemma2-3b-mix-224` or a local checkpoint.\n\n",
}


# What each demo model knows, as its card's `palikit_limits` front matter (`palikit.weights.card`): the
# pre-flight of `palikit train` / `palikit check` reads it and says what a fine-tune can expect.
LIMITS = {
    1: {"summary": "a 3.5M-parameter toy trained only on synthetic shapes at 112 px: it places boxes on a 4x4 grid "
                   "of 28 px cells and knows 3 shapes, 4 colours and 20 words. A short fine-tune teaches it new "
                   "words it sees many times (recognised as wholes; its tokenizer spells them letter by letter); "
                   "text it never saw twice (codes, serial numbers) and new objects at free positions are beyond it "
                   "(16 image tokens, boxes only on its grid): use real PaliGemma weights for those",
        "reading": "words",  # it recognises rendered words it was trained on as wholes; it does not read characters
        "image_size": 112, "grid": 4, "classes": ["circle", "square", "triangle"],
        "colors": ["red", "green", "blue", "yellow"],
        "words": ["ART", "BOX", "BUS", "CAT", "CUP", "DOT", "FOX", "GEM", "HAT", "INK", "JAM", "KEY", "MAP", "OAK",
                  "OWL", "PEN", "SUN", "TOY", "WEB", "ZIP"],
        "prompts": ["caption en", "detect", "segment", "ocr", "answer en"],
        "max_text_tokens": 128,  # its longest training rows: 80 tokens (segment, 3 shapes)
        "vocabulary": "closed"},
    2: {"summary": "shapes v2 at 224 px: six classes at free positions, sizes and aspect ratios, words in many fonts",
        "image_size": 224, "grid": None,
        "classes": ["circle", "square", "triangle", "star", "cross", "hexagon"],  # shapes2.CLASSES
        "prompts": ["caption en", "detect", "segment", "ocr", "answer en"], "max_text_tokens": 256,
        "vocabulary": "closed"},
}


def card_front_matter(version: int) -> str:
    """The card's YAML front matter: Hub metadata and the model's `palikit_limits`."""
    import yaml

    meta = {"library_name": "palikit", "tags": ["paligemma", "palikit", "demo"], "palikit_limits": LIMITS[version]}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, width=100, default_flow_style=None) + "---\n\n"


def install(model_dir: str | Path, results: dict, dest: str | Path = DEMO_MODEL_DIR, *, n_test: int = 0,
            force: bool = False, version: int = 1) -> Path:
    """Copy a trained demo checkpoint into the package (atomically: `fileio.atomic_dir`) with its
    `scorecard.json` and a model card. Refuses a model that misses a target unless forced,
    and a `dest` inside a palikit installed non-editable (see `paths.check_install_dest`)."""
    check_install_dest(dest)
    missed = missed_targets(results, version)
    if missed and not force:
        raise ValueError(f"not installing: below target on {missed}; train longer or pass --force")
    model_dir, dest = Path(model_dir), Path(dest)
    for name in REQUIRED_FILES:
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir} has no {name}: export the model with its tokenizer and codec")
    card = {**numeric(results), "version": version, "test_images": n_test,
            "missed_targets": {k: v for k, (v, _) in missed.items()}}
    below = ("\n**Below target on: " + ", ".join(f"{t} ({v:.3f} < {target})" for t, (v, target) in missed.items())
             + "** (installed with --force).\n") if missed else ""

    def fill(tmp: Path) -> None:
        for name in REQUIRED_FILES + OPTIONAL_FILES:
            if (model_dir / name).exists():
                shutil.copy2(model_dir / name, tmp / name)
        (tmp / "scorecard.json").write_text(json.dumps(card, indent=2) + "\n")
        (tmp / "README.md").write_text(card_front_matter(version) + MODEL_CARD[version] + f"Scorecard on {n_test or 'the'} held-out test images "
                                       f"(`python -m lab.demo.evaluate --version {version}`):\n\n"
                                       + markdown(results, version) + "\n" + below)

    return atomic_dir(dest, fill)


def main() -> None:
    from palikit.api import PaliGemma

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = default_build_dir()  # where `python -m lab.demo.build` and the recipes put things
    ap.add_argument("--model", default=str(work / "anneal" / "final"))
    ap.add_argument("--data", default=str(work / "data"))
    ap.add_argument("--out", default=str(work / "eval"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--version", type=int, default=1, choices=(1, 2), help="the demo model's version (its targets)")
    ap.add_argument("--install", action="store_true",
                    help="copy the model into src/palikit/assets/demo-model (source checkouts only)")
    ap.add_argument("--force", action="store_true", help="install even when a target is missed")
    a = ap.parse_args()
    if a.install:  # before the scorecard's minutes, not after
        try:
            check_install_dest(DEMO_MODEL_DIR)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    pg = PaliGemma.from_pretrained(a.model, device="auto")
    results = scorecard(pg, a.data, a.out, limit=a.limit, version=a.version)
    print(markdown(results, a.version))
    print(json.dumps(numeric(results)))
    if a.install:
        n_test = sum(1 for _ in (Path(a.data) / "test").glob("*.png"))
        n_test = min(n_test, a.limit) if a.limit else n_test
        try:
            print(f"installed in {install(a.model, results, n_test=n_test, force=a.force, version=a.version)}")
        except (ValueError, FileNotFoundError) as e:  # a missed target or a folder without the files: no traceback
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
