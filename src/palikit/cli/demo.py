"""`palikit demo`: the main job of a fresh clone. Renders example images from the synthetic "shapes"
generator, runs every task (caption, detect, segment, ocr, counting and colour questions) with the
bundled demo model, prints the results and writes annotated PNGs.

When this install has no trained demo model yet, it says so and runs the same pipeline on a tiny
random checkpoint in the real on-disk format instead: that checks the installation end to end
(loading, tokenizer, preprocessing, generation, parsing, drawing) but its answers are noise.
"""

from __future__ import annotations

from pathlib import Path

import typer

from . import app

TASKS = (
    ("caption", "caption en"),
    ("detect", "detect circle ; square ; triangle"),
    ("segment", "segment circle"),
    ("ocr", "ocr"),
    ("count", "answer en how many squares are there"),
    ("color", "answer en what color is the circle"),
)


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
    out.mkdir(parents=True, exist_ok=True)
    if model is None and bundled_demo_model() is None:
        from ..testing import make_tiny_checkpoint

        console.print("[yellow]No trained demo model is bundled in this install yet[/yellow]: running the whole "
                      "pipeline on a tiny RANDOM checkpoint (real on-disk format), so the answers below are noise. "
                      f"For real answers, {DEMO_HINT}.")
        model = str(make_tiny_checkpoint(out / "random-checkpoint", family="pg2", image_size=112))
    elif model is None:
        model = str(bundled_demo_model())
        console.print(f"Using the bundled demo model (tiny, trained on synthetic shapes); {DEMO_HINT}.")
    pg = PaliGemma.from_pretrained(model, device=device)
    size = pg.model.config.vision.image_size
    table = Table("image", "task", "prompt", "answer", "boxes / masks", title=f"palikit demo ({pg.name})")
    for i in range(images):
        sample = make_sample(i, seed=2_000_003, size=max(size, 112))  # the test split's seed
        path = out / f"example{i}.png"
        sample.image.save(path)
        results = pg.predict_batch([path] * len(TASKS), [p for _, p in TASKS], max_new_tokens=48)
        for (task, prompt), r in zip(TASKS, results):
            dets = ", ".join(f"{d.label or '?'}@({d.box[0]:.0f},{d.box[1]:.0f},{d.box[2]:.0f},{d.box[3]:.0f})"
                             + ("" if d.score is None else f" {d.score:.2f}") + (" +mask" if d.mask is not None else "")
                             for d in r.detections)
            table.add_row(path.name, task, prompt, r.text[:60], dets[:80])
            if task in ("detect", "segment"):
                save_png(draw(sample.image, r.detections), out / f"example{i}-{task}.png")
    console.print(table)
    console.print(f"Annotated images written to {out}/")
