"""`palikit demo`: the main job of a fresh clone. Renders example images from the synthetic "shapes"
generator, runs every task (caption, detect, segment, ocr, counting and colour questions) with the
bundled demo model, prints the results and writes annotated PNGs.

The example images come from the generator's held-out test split, so the table shows the expected
answer next to each one. When the install has no trained demo model, it says so and runs the same
pipeline on a tiny random checkpoint in the real on-disk format instead: that checks the installation
end to end (loading, tokenizer, preprocessing, generation, parsing, drawing) but its answers are noise.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app


def demo_prompts(sample) -> list[tuple[str, str, str]]:
    """(task, prompt, expected answer) for one generated image: what the generator knows is in it."""
    import random

    from ..demo.shapes import CLASSES, examples

    present = sorted({s.cls for s in sample.shapes}, key=CLASSES.index)
    by_task: dict[str, tuple[str, str]] = {}
    for ex in examples(sample, random.Random(sample.index)):
        by_task.setdefault(ex["task"], (ex["prefix"], ex["suffix"]))
    by_task["segment"] = ("segment " + " ; ".join(present), "")
    rows = []
    for task in ("caption", "detect", "segment", "ocr", "count", "color"):
        if task in by_task:
            prompt, suffix = by_task[task]
            expected = suffix
            if task in ("detect", "segment"):
                asked = prompt.split(" ", 1)[1].split(" ; ")
                expected = ", ".join(sorted(s.cls for s in sample.shapes if s.cls in asked))
            rows.append((task, prompt, expected))
    return rows


@app.command()
def demo(
    out: Path = typer.Option(Path("out/demo"), help="Where example images and annotated PNGs go."),
    images: int = typer.Option(4, help="How many example images."),
    model: str = typer.Option(None, "--model", "-m", help="Another checkpoint to run the demo with."),
    device: str = typer.Option("auto"),
):
    """Run every task on example images and write annotated PNGs."""
    from rich.console import Console
    from rich.table import Table

    from ..api import PaliGemma
    from ..demo.shapes import make_sample
    from ..tasks.draw import draw, save_png
    from .predict import DEMO_HINT, bundled_demo_model

    console = Console()
    if not console.is_terminal:
        console.width = 150  # logs and CI: one row per answer instead of wrapped cells
    out.mkdir(parents=True, exist_ok=True)
    if model is None and bundled_demo_model() is None:
        from ..testing import make_tiny_checkpoint

        console.print("[yellow]No trained demo model is bundled in this install[/yellow]: running the whole "
                      "pipeline on a tiny RANDOM checkpoint (real on-disk format), so the answers below are noise. "
                      f"For real answers, {DEMO_HINT}.")
        model = str(make_tiny_checkpoint(out / "random-checkpoint", family="pg2", image_size=112))
    elif model is None:
        model = str(bundled_demo_model())
        console.print(f"Using the bundled demo model (tiny, trained on synthetic shapes); {DEMO_HINT}.")
    pg = PaliGemma.from_pretrained(model, device=device)
    size = pg.model.config.vision.image_size
    table = Table("#", "task", "prompt", "answer", "expected", "boxes / masks (score)",
                  title=f"palikit demo ({pg.name})")
    right = total = 0
    for i in range(images):
        sample = make_sample(i, seed=2_000_003, size=max(size, 112))  # the test split: never trained on
        path = out / f"example{i}.png"
        sample.image.save(path)
        rows = demo_prompts(sample)
        results = pg.predict_batch([path] * len(rows), [p for _, p, _ in rows], max_new_tokens=96)
        for (task, prompt, expected), r in zip(rows, results):
            dets = ", ".join(f"{d.label or '?'}@({d.box[0]:.0f},{d.box[1]:.0f},{d.box[2]:.0f},{d.box[3]:.0f})"
                             + ("" if d.score is None else f" {d.score:.2f}") + (" +mask" if d.mask is not None else "")
                             for d in r.detections)
            got = ", ".join(sorted(d.label for d in r.detections)) if task in ("detect", "segment") else r.text
            right, total = right + (got == expected), total + 1
            table.add_row(str(i), task, prompt, r.text[:48], expected, dets[:90])
            if task in ("detect", "segment"):
                save_png(draw(sample.image, r.detections), out / f"example{i}-{task}.png")
    console.print(table)
    console.print(f"{right}/{total} answers as expected (detect/segment: the right labels; boxes and masks are "
                  f"drawn in the PNGs). Annotated images written to {out}/")
