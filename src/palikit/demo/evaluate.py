"""The demo model's scorecard, measured with `palikit.eval` on the shapes test split: detection
mAP@0.5 and segmentation mIoU on the COCO ground truth, exact match for OCR, counting, colour and
captions. Prints a Markdown table (the README's) and writes each task's report under `out`.

    python -m palikit.demo.evaluate --model work/demo/run/final --data work/demo/data --out work/demo/eval
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    lines = ["| task | metric | demo model | target |", "|---|---|---|---|"]
    for task, (metric, target) in TARGETS.items():
        value = results.get(task, {}).get(metric)
        shown = "n/a" if value is None else f"{value:.3f}"
        lines.append(f"| {task} | {metric} | {shown} | >= {target} |")
    return "\n".join(lines)


def main() -> None:
    from ..api import PaliGemma

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="work/demo/run/final")
    ap.add_argument("--data", default="work/demo/data")
    ap.add_argument("--out", default="work/demo/eval")
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()
    pg = PaliGemma.from_pretrained(a.model, device="auto")
    results = scorecard(pg, a.data, a.out, limit=a.limit)
    print(markdown(results))
    print(json.dumps({k: {m: v for m, v in r.items() if isinstance(v, (int, float))} for k, r in results.items()}))


if __name__ == "__main__":
    main()
