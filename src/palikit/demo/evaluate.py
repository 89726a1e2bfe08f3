"""The demo model's scorecard, measured with `palikit.eval` on the shapes test split: detection
mAP@0.5 and segmentation mIoU on the COCO ground truth, exact match for OCR, counting, colour and
captions. Prints a Markdown table (the README's) and writes each task's report under `out`.

    python -m palikit.demo.evaluate --model work/demo/anneal/final --data work/demo/data --out work/demo/eval
    python -m palikit.demo.evaluate ... --install    # + copy it into src/palikit/assets/demo-model

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

from .paths import ASSET_DIR, check_install_dest, default_build_dir

TARGETS = {"detect": ("map50", 0.7), "segment": ("miou", 0.6), "ocr": ("exact_match", 0.8),
           "count": ("accuracy", 0.8), "color": ("exact_match", 0.8), "caption": ("exact_match", 0.7)}
JSONL_METRIC_TASK = {"ocr": "exact", "count": "count", "color": "exact", "caption": "exact"}


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


def scorecard(model, data: str | Path, out: str | Path, *, limit: int | None = None, batch_size: int = 16) -> dict:
    from ..eval import evaluate, load_coco

    data, out = Path(data), Path(out)
    files = split_by_task(data / "test.jsonl", out / "splits")
    results = {}
    for task, metric_task in JSONL_METRIC_TASK.items():
        rep = evaluate(model, files[task], metric_task, out_dir=out / task, limit=limit, batch_size=batch_size,
                       progress=False, charts=False, predict_options={"max_new_tokens": 32})
        results[task] = rep.metrics
    for task in ("detect", "segment"):
        ds = load_coco(data / "test_coco.json", task, image_root=data)
        rep = evaluate(model, ds, task, out_dir=out / task, limit=limit, batch_size=batch_size, progress=False,
                       charts=False, predict_options={"max_new_tokens": 64 if task == "detect" else 96})
        results[task] = rep.metrics
    return results


def markdown(results: dict) -> str:
    lines = ["| task | metric | demo model | target | met |", "|---|---|---|---|---|"]
    for task, (metric, target) in TARGETS.items():
        value = results.get(task, {}).get(metric)
        shown = "n/a" if value is None else f"{value:.3f}"
        met = "yes" if value is not None and value >= target else "**no**"
        lines.append(f"| {task} | {metric} | {shown} | >= {target} | {met} |")
    return "\n".join(lines)


REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "preprocessor_config.json", "vae-oid.npz")
OPTIONAL_FILES = ("generation_config.json",)


def numeric(results: dict) -> dict:
    """Each task's numeric metrics (what goes into JSON; per-sample lists left out)."""
    return {task: {m: v for m, v in r.items() if isinstance(v, (int, float))} for task, r in results.items()}


def missed_targets(results: dict) -> dict[str, float]:
    return {task: results.get(task, {}).get(metric, float("nan")) for task, (metric, target) in TARGETS.items()
            if not results.get(task, {}).get(metric, float("-inf")) >= target}


def install(model_dir: str | Path, results: dict, dest: str | Path = ASSET_DIR, *, n_test: int = 0,
            force: bool = False) -> Path:
    """Copy a trained demo checkpoint into the package (atomically: a temp folder renamed over the old
    one) with its `scorecard.json` and a model card. Refuses a model that misses a target unless forced,
    and a `dest` inside a palikit installed non-editable (see `paths.check_install_dest`)."""
    check_install_dest(dest)
    missed = missed_targets(results)
    if missed and not force:
        raise ValueError(f"not installing: below target on {missed}; train longer or pass --force")
    model_dir, dest = Path(model_dir), Path(dest)
    for name in REQUIRED_FILES:
        if not (model_dir / name).exists():
            raise FileNotFoundError(f"{model_dir} has no {name}: export the model with its tokenizer and codec")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in REQUIRED_FILES + OPTIONAL_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, tmp / name)
    card = {**numeric(results), "test_images": n_test, "missed_targets": missed}
    (tmp / "scorecard.json").write_text(json.dumps(card, indent=2) + "\n")
    below = ("\n**Below target on: " + ", ".join(f"{t} ({v:.3f} < {TARGETS[t][1]})" for t, v in missed.items())
             + "** (installed with --force).\n") if missed else ""
    (tmp / "README.md").write_text(
        "# palikit demo model\n\nA 3.5M-parameter PaliGemma 2-architecture model trained on the synthetic "
        "\"shapes\" data set (`python -m palikit.demo.build`) by three recipes in turn: `recipes/demo-ocr-warmup.yaml`, "
        "`recipes/demo.yaml`, `recipes/demo-anneal.yaml` (`make demo-model`). It only knows that world: "
        "for real images use `--model google/paligemma2-3b-mix-224` or a local checkpoint.\n\n"
        f"Scorecard on {n_test or 'the'} held-out test images (`python -m palikit.demo.evaluate`):\n\n"
        + markdown(results) + "\n" + below)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest


def main() -> None:
    from ..api import PaliGemma

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work = default_build_dir()  # where `python -m palikit.demo.build` and the recipes put things
    ap.add_argument("--model", default=str(work / "anneal" / "final"))
    ap.add_argument("--data", default=str(work / "data"))
    ap.add_argument("--out", default=str(work / "eval"))
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--install", action="store_true",
                    help="copy the model into src/palikit/assets/demo-model (source checkouts only)")
    ap.add_argument("--force", action="store_true", help="install even when a target is missed")
    a = ap.parse_args()
    if a.install:  # before the scorecard's minutes, not after
        try:
            check_install_dest(ASSET_DIR)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    pg = PaliGemma.from_pretrained(a.model, device="auto")
    results = scorecard(pg, a.data, a.out, limit=a.limit)
    print(markdown(results))
    print(json.dumps(numeric(results)))
    if a.install:
        n_test = sum(1 for _ in (Path(a.data) / "test").glob("*.png"))
        n_test = min(n_test, a.limit) if a.limit else n_test
        try:
            print(f"installed in {install(a.model, results, n_test=n_test, force=a.force)}")
        except (ValueError, FileNotFoundError) as e:  # a missed target or a folder without the files: no traceback
            raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
