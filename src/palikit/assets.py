"""What ships inside the package and which model a command means when it names none: the bundled
demo model (`palikit/assets/demo-model`, package data beside this module), the names that mean it
(no model, "", "demo") and the one-line notice and hint every entry point prints when it falls back
to it. The CLI, `palikit train`, the benchmarks and `weights.resolve` all ask `default_model`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent  # the imported palikit package
DEMO_MODEL_DIR = PACKAGE_DIR / "assets" / "demo-model"
DEMO_NAMES = ("", "demo")  # besides None: the names that mean the bundled demo model
DEMO_HINT = "point it at real weights with --model google/paligemma2-3b-mix-224 or a local checkpoint folder"


def bundled_demo_model() -> Path | None:
    """The bundled demo model's folder, or None when this install has none."""
    return DEMO_MODEL_DIR if (DEMO_MODEL_DIR / "config.json").exists() else None


def means_demo(model: str | os.PathLike | None) -> bool:
    """Whether `model` names the bundled demo model: None, "" or "demo" (a real folder called `demo`
    in the working directory is that folder, not the demo model)."""
    if model is None:
        return True
    return str(model) in DEMO_NAMES and not (str(model) and Path(model).exists())


def default_model(model: str | os.PathLike | None, log: Callable[[str], None] | None = None,
                  hint: str = DEMO_HINT) -> str:
    """`model` as given, or for None / "" / "demo" the bundled demo model's folder, with `log` told so
    in one line. ValueError (naming `hint`, what to pass instead) when the install has no demo model."""
    if not means_demo(model):
        return str(model)
    demo = bundled_demo_model()
    if demo is None:
        given = "no model given" if not model else f"model {str(model)!r} means the bundled demo model, but"
        raise ValueError(f"{given}: this install has no bundled demo model; {hint}.")
    if log is not None:
        log(f"Using the bundled demo model {demo} (tiny, trained on synthetic shapes); {hint}.")
    return str(demo)
