"""Where the demo-model factory may write: the build's work folder (`<checkout>/work/demo`, what the
recipes under lab/recipes/ read; never inside the palikit package) and the bundled demo model
(`palikit.assets.DEMO_MODEL_DIR`), which `python -m lab.demo.evaluate --install` replaces only when palikit
is imported from this source checkout (an editable install), never in a site-packages palikit."""

from __future__ import annotations

import os
from pathlib import Path

from palikit import assets

CHECKOUT = Path(__file__).resolve().parents[2]  # lab/ lives at the top of a source checkout
PACKAGE_DIR = assets.PACKAGE_DIR  # the imported palikit package


def source_checkout(package_dir: Path | None = None) -> Path | None:
    """The repository root when palikit is imported from a source checkout (`<root>/src/palikit`, with
    `<root>/pyproject.toml`; an editable install counts), else None (a wheel in site-packages)."""
    pkg = Path(package_dir or PACKAGE_DIR).resolve()
    root = pkg.parent.parent
    if pkg.parent.name != "src" or not (root / "pyproject.toml").is_file():
        return None
    if any(part in ("site-packages", "dist-packages") for part in pkg.parts):
        return None
    return root


def default_build_dir() -> Path:
    """`<checkout>/work/demo`: what the recipes under lab/recipes/ read."""
    return CHECKOUT / "work" / "demo"


def inside_package(path: str | os.PathLike) -> bool:
    p = Path(path).resolve()
    return p == PACKAGE_DIR or PACKAGE_DIR in p.parents


def check_build_dir(out: str | os.PathLike) -> Path:
    """`out` as a Path; ValueError if it lies inside the palikit package (build files are work files,
    not package data: they would be shipped or lost on reinstall)."""
    if inside_package(out):
        raise ValueError(f"--out {out} is inside the palikit package ({PACKAGE_DIR}); the build writes work files "
                         f"(data, checkpoints): give a folder outside it (default: {default_build_dir()})")
    return Path(out)


def check_install_dest(dest: str | os.PathLike) -> Path:
    """`dest` as a Path; ValueError when it lies inside a palikit that is not a source checkout (a
    non-editable install in site-packages: copying a model there changes one machine's installed
    package, which the next `pip install` overwrites)."""
    if inside_package(dest) and source_checkout() is None:
        raise ValueError(f"--install replaces the demo model of a source checkout (src/palikit/assets/demo-model), but "
                         f"palikit is imported from an installed package ({PACKAGE_DIR}). Run it from a git clone "
                         "(`pip install -e .`), or keep the model where it is and pass its folder as --model.")
    return Path(dest)
