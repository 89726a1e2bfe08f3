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

from pathlib import Path

import typer

from ..eval.instances import IOU_THRESHOLD, judge_instances
from . import app

TASKS = ("caption", "detect", "segment", "ocr", "count", "color")
INSTANCE_TASKS = ("detect", "segment", "refer_detect")  # judged instance by instance (`eval.instances`)
RULE = (f"text: exact match; detect (and a referring detect, labelled with its expression): label and box IoU >= "
        f"{IOU_THRESHOLD} with an expected box, one-to-one, none missing or extra; segment: the same with mask IoU >= "
        f"{IOU_THRESHOLD}")


def demo_generator(pg):
    """The shapes generator a model is shown: v1's 4x4 grid at 112 px for 112 px models (the v1 demo
    model, the random stand-in), else shapes v2 (free positions, any image size; the v2 demo model)."""
    from ..demo import shapes, shapes2

    return shapes if pg.model.config.vision.image_size <= 112 else shapes2


def demo_prompts(sample, generator=None) -> list[tuple[str, str, str, list]]:
    """(task, prompt, expected answer, expected instances) for one generated image: what the generator
    knows is in it. Expected instances are the generator's shapes of the asked classes (detect and
    segment rows; a referring detect's one instance, labelled with the expression), [] for text rows."""
    import random

    from ..demo import shapes
    from ..eval.instances import Expected

    gen = generator or shapes
    order = getattr(gen, "ALL_CLASSES", gen.CLASSES)
    present = sorted({s.cls for s in sample.shapes}, key=order.index)
    by_task: dict[str, dict] = {}
    for ex in gen.examples(sample, random.Random(sample.index)):
        by_task.setdefault(ex["task"], ex)
    by_task["segment"] = {"prefix": "segment " + " ; ".join(present), "suffix": ""}
    rows = []
    for task in TASKS + (("refer_detect",) if "refer_detect" in by_task else ()):
        if task in by_task:
            prompt, expected, truth = by_task[task]["prefix"], by_task[task]["suffix"], []
            if task in ("detect", "segment"):
                asked = prompt.split(" ", 1)[1].split(" ; ")
                truth = [s for s in sample.shapes if s.cls in asked]
            elif task == "refer_detect":
                box = by_task[task]["box"]
                truth = [Expected(prompt.split(" ", 1)[1], box)] if box else []
            if task in INSTANCE_TASKS:
                expected = ", ".join(f"{s.cls}@{_box(s.box)}" for s in sorted(truth, key=lambda s: s.cls)) or "(none)"
            rows.append((task, prompt, expected, truth))
    return rows


def _box(box) -> str:
    return "(" + ",".join(f"{v:.0f}" for v in box) + ")"


def judge_row(task: str, result, expected: str, truth: list) -> tuple[bool, str]:
    """(answer is as expected, the boxes / masks cell: each detection with score and IoU)."""
    if task not in INSTANCE_TASKS:
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


def _load(model: str | None, out: Path, device: str, console, quantize: str | None = None):
    from ..api import PaliGemma
    from ..assets import DEMO_HINT, bundled_demo_model, default_model

    if model is None and bundled_demo_model() is None:
        from ..testing import make_tiny_checkpoint

        console.print("[yellow]No trained demo model is bundled in this install[/yellow]: running the whole "
                      "pipeline on a tiny RANDOM checkpoint (real on-disk format), so the answers below are noise. "
                      f"For real answers, {DEMO_HINT}.")
        model = str(make_tiny_checkpoint(out / "random-checkpoint", family="pg2", image_size=112))
    return PaliGemma.from_pretrained(default_model(model, log=console.print), device=device, quantize=quantize)


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where example images and annotated PNGs go."),
    images: int = typer.Option(4, help="How many example images."),
    model: str = typer.Option(None, "--model", "-m", help="Another checkpoint to run the demo with."),
    device: str = typer.Option("auto"),
    quantize: str = typer.Option(None, "--quantize", help="int8 or int4: quantize the weights at load."),
):
    """Run every task on example images, judge each answer against the ground truth, write annotated PNGs."""
    from rich.console import Console
    from rich.table import Table

    from ..demo import shapes2
    from ..tasks.draw import draw, save_png

    console = Console()
    if not console.is_terminal:
        console.width = 150  # logs and CI: one row per answer instead of wrapped cells
    out.mkdir(parents=True, exist_ok=True)
    pg = _load(model, out, device, console, quantize)
    size = pg.model.config.vision.image_size
    gen = demo_generator(pg)
    table = Table("#", "task", "prompt", "answer", "expected", "ok", "boxes / masks (score, IoU vs expected)",
                  title=f"palikit demo ({pg.name})")
    tally: dict[str, list[int]] = {}  # task -> [right, total]
    for i in range(images):
        # the test split: never trained on (v2: each image its own random size and aspect ratio)
        sample = gen.make_sample(i, seed=gen.SPLIT_SEEDS["test"], size=None if gen is shapes2 else max(size, 112))
        path = out / f"example{i}.png"
        sample.image.save(path)
        rows = demo_prompts(sample, gen)
        results = pg.predict_batch([path] * len(rows), [p for _, p, _, _ in rows], max_new_tokens=96)
        for (task, prompt, expected, truth), r in zip(rows, results):
            ok, cell = judge_row(task, r, expected, truth)
            counts = tally.setdefault(task, [0, 0])
            counts[0], counts[1] = counts[0] + ok, counts[1] + 1
            table.add_row(str(i), task, prompt, r.text[:48], expected, "yes" if ok else "[red]NO[/red]", cell[:120])
            if task in INSTANCE_TASKS:
                save_png(draw(sample.image, r.detections), out / f"example{i}-{task}.png")
    console.print(table)
    right, total = sum(c[0] for c in tally.values()), sum(c[1] for c in tally.values())
    per_task = ", ".join(f"{t} {c[0]}/{c[1]}" for t, c in tally.items())
    console.print(f"{right}/{total} answers as expected ({per_task}). Judged against the generator's ground truth: "
                  f"{RULE}. Annotated images written to {out}/")
