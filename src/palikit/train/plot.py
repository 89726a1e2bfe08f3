"""Loss-curve PNG: matplotlib when installed, else a small chart drawn with PIL (no extra dependency)."""

from __future__ import annotations

import io
from pathlib import Path

from ..fileio import atomic_write_bytes


def loss_curve_png(train: list[tuple[int, float]], val: list[tuple[int, float]], path: str | Path, title: str = "") -> Path:
    path = Path(path)
    try:
        data = _matplotlib(train, val, title)
    except ImportError:
        data = _pil(train, val, title)
    atomic_write_bytes(path, data)
    return path


def _matplotlib(train, val, title) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _pil(train, val, title) -> bytes:
    from PIL import Image, ImageDraw

    W, H, L, R, T, B = 640, 400, 60, 20, 30, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    pts = list(train) + list(val)
    if pts:
        xs = [p[0] for p in pts]
        ys = [p[1] for p in pts]
        x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

        def sx(x):
            return L + (x - x0) / (x1 - x0) * (W - L - R)

        def sy(y):
            return H - B - (y - y0) / (y1 - y0) * (H - T - B)

        d.rectangle([L, T, W - R, H - B], outline="black")
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            d.line([L - 4, sy(yv), L, sy(yv)], fill="black")
            d.text((4, sy(yv) - 6), f"{yv:.3g}", fill="black")
            xv = x0 + (x1 - x0) * i / 4
            d.text((sx(xv) - 10, H - B + 6), f"{xv:.0f}", fill="black")
        for series, color in ((train, (31, 119, 180)), (val, (255, 127, 14))):
            if len(series) > 1:
                d.line([(sx(x), sy(y)) for x, y in series], fill=color, width=2)
            for x, y in series if series is val else series[-1:]:
                d.ellipse([sx(x) - 3, sy(y) - 3, sx(x) + 3, sy(y) + 3], fill=color)
        d.text((L, 8), f"{title}  train (blue) / val (orange) loss vs step", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def progress_bar(total: int, completed: int = 0):
    """A started rich progress bar for the training steps: (progress, task id)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    p = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                 TimeRemainingColumn())
    task = p.add_task("training", total=total, completed=completed)
    p.start()
    return p, task
