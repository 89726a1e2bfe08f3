"""`palikit demo`: the main job of a fresh clone. Renders example images from the synthetic "shapes"
generator, runs every task (caption, detect, segment, ocr, counting and colour questions) with the
bundled demo model, prints the results and writes annotated PNGs.

The example images come from the generator's held-out test split, so the table shows the expected
answer next to each one, and each answer is judged against the generator's ground truth: text
answers by exact match; detect answers box by box (label and box IoU >= 0.5 with an expected box,
matched one-to-one, nothing missing or extra); segment answers the same way by mask IoU. When the
install has no trained demo model, it says so and runs the same pipeline on a tiny random checkpoint
in the real on-disk format instead: that checks the installation end to end (loading, tokenizer,
preprocessing, generation, parsing, drawing) but its answers are noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import typer

from . import app

TASKS = ("caption", "detect", "segment", "ocr", "count", "color")
IOU_THRESHOLD = 0.5
RULE = (f"text: exact match; detect: label and box IoU >= {IOU_THRESHOLD} with an expected box, one-to-one, "
        f"none missing or extra; segment: the same with mask IoU >= {IOU_THRESHOLD}")


@dataclass
class Verdict:
    """How one detect/segment answer compares with the ground truth: `ious[k]` is the IoU of
    detection k with the expected instance it is matched to (or, when unmatched, its best IoU with an
    expected instance of its label, 0.0 if none); `matched[k]` whether it counts; `missed` how many
    expected instances no detection matched."""

    ok: bool
    ious: list[float]
    matched: list[bool]
    missed: int


def judge_instances(detections: Sequence, truth: Sequence, *, by: str = "box",
                    threshold: float = IOU_THRESHOLD) -> Verdict:
    """Match detections to the expected shapes (each with `.cls`, `.box`, `.mask`) one-to-one, greedily
    by descending IoU among same-label pairs with IoU >= threshold. `by="box"` uses box IoU, `by="mask"`
    mask IoU (a detection without a mask, or of another size, scores 0). The answer is right when every
    detection and every expected instance is matched."""
    from ..eval.metrics import mask_iou
    from ..tasks.boxes import box_iou

    if by not in ("box", "mask"):
        raise ValueError(f"by must be 'box' or 'mask', got {by!r}")

    def iou(d, t) -> float:
        return box_iou(d.box, t.box) if by == "box" else mask_iou(d.mask, t.mask)

    table = [[iou(d, t) if d.label == t.cls else 0.0 for t in truth] for d in detections]  # [D][T]
    pairs = sorted(((table[i][j], i, j) for i in range(len(detections)) for j in range(len(truth))
                    if detections[i].label == truth[j].cls and table[i][j] >= threshold), reverse=True)
    det_to, used = {}, set()
    for value, i, j in pairs:
        if i not in det_to and j not in used:
            det_to[i] = j
            used.add(j)
    ious = [table[i][det_to[i]] if i in det_to else max(table[i], default=0.0) for i in range(len(detections))]
    matched = [i in det_to for i in range(len(detections))]
    missed = len(truth) - len(used)
    return Verdict(all(matched) and missed == 0, ious, matched, missed)


def demo_prompts(sample) -> list[tuple[str, str, str, list]]:
    """(task, prompt, expected answer, expected instances) for one generated image: what the generator
    knows is in it. Expected instances are the generator's shapes of the asked classes (detect and
    segment rows), [] for text rows."""
    import random

    from ..demo.shapes import CLASSES, examples

    present = sorted({s.cls for s in sample.shapes}, key=CLASSES.index)
    by_task: dict[str, tuple[str, str]] = {}
    for ex in examples(sample, random.Random(sample.index)):
        by_task.setdefault(ex["task"], (ex["prefix"], ex["suffix"]))
    by_task["segment"] = ("segment " + " ; ".join(present), "")
    rows = []
    for task in TASKS:
        if task in by_task:
            prompt, expected = by_task[task]
            truth: list = []
            if task in ("detect", "segment"):
                asked = prompt.split(" ", 1)[1].split(" ; ")
                truth = [s for s in sample.shapes if s.cls in asked]
                expected = ", ".join(f"{s.cls}@{_box(s.box)}" for s in sorted(truth, key=lambda s: s.cls))
            rows.append((task, prompt, expected, truth))
    return rows


def _box(box) -> str:
    return "(" + ",".join(f"{v:.0f}" for v in box) + ")"


def judge_row(task: str, result, expected: str, truth: list) -> tuple[bool, str]:
    """(answer is as expected, the boxes / masks cell: each detection with score and IoU)."""
    if task not in ("detect", "segment"):
        return result.text == expected, ""
    verdict = judge_instances(result.detections, truth, by="box" if task == "detect" else "mask")
    kind = "IoU" if task == "detect" else "mask IoU"
    cells = []
    for d, v, hit in zip(result.detections, verdict.ious, verdict.matched):
        score = "" if d.score is None else f" {d.score:.2f}"
        cells.append(f"{d.label or '?'}@{_box(d.box)}{score} {kind} {v:.2f}{'' if hit else ' MISS'}")
    if verdict.missed:
        cells.append(f"{verdict.missed} expected not found")
    return verdict.ok, ", ".join(cells)


def _load(model: str | None, out: Path, device: str, console):
    from ..api import PaliGemma
    from .predict import DEMO_HINT, bundled_demo_model

    if model is None and bundled_demo_model() is None:
        from ..testing import make_tiny_checkpoint

        console.print("[yellow]No trained demo model is bundled in this install[/yellow]: running the whole "
                      "pipeline on a tiny RANDOM checkpoint (real on-disk format), so the answers below are noise. "
                      f"For real answers, {DEMO_HINT}.")
        model = str(make_tiny_checkpoint(out / "random-checkpoint", family="pg2", image_size=112))
    elif model is None:
        model = str(bundled_demo_model())
        console.print(f"Using the bundled demo model (tiny, trained on synthetic shapes); {DEMO_HINT}.")
    return PaliGemma.from_pretrained(model, device=device)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where example images and annotated PNGs go."),
    images: int = typer.Option(4, help="How many example images."),
    model: str = typer.Option(None, "--model", "-m", help="Another checkpoint to run the demo with."),
    device: str = typer.Option("auto"),
):
    """Run every task on example images, judge each answer against the ground truth, write annotated PNGs."""
    from rich.console import Console
    from rich.table import Table

    from ..demo.shapes import make_sample
    from ..tasks.draw import draw, save_png

    console = Console()
    if not console.is_terminal:
        console.width = 150  # logs and CI: one row per answer instead of wrapped cells
    out.mkdir(parents=True, exist_ok=True)
    pg = _load(model, out, device, console)
    size = pg.model.config.vision.image_size
    table = Table("#", "task", "prompt", "answer", "expected", "ok", "boxes / masks (score, IoU vs expected)",
                  title=f"palikit demo ({pg.name})")
    tally: dict[str, list[int]] = {}  # task -> [right, total]
    for i in range(images):
        sample = make_sample(i, seed=2_000_003, size=max(size, 112))  # the test split: never trained on
        path = out / f"example{i}.png"
        sample.image.save(path)
        rows = demo_prompts(sample)
        results = pg.predict_batch([path] * len(rows), [p for _, p, _, _ in rows], max_new_tokens=96)
        for (task, prompt, expected, truth), r in zip(rows, results):
            ok, cell = judge_row(task, r, expected, truth)
            counts = tally.setdefault(task, [0, 0])
            counts[0], counts[1] = counts[0] + ok, counts[1] + 1
            table.add_row(str(i), task, prompt, r.text[:48], expected, "yes" if ok else "[red]NO[/red]", cell[:120])
            if task in ("detect", "segment"):
                save_png(draw(sample.image, r.detections), out / f"example{i}-{task}.png")
    console.print(table)
    right, total = sum(c[0] for c in tally.values()), sum(c[1] for c in tally.values())
    per_task = ", ".join(f"{t} {tally[t][0]}/{tally[t][1]}" for t in TASKS if t in tally)
    console.print(f"{right}/{total} answers as expected ({per_task}). Judged against the generator's ground truth: "
                  f"{RULE}. Annotated images written to {out}/")
