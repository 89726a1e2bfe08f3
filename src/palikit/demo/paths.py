"""Where the demo scripts may write: the build's work folder (a user folder, never inside the installed
package) and the bundled demo model (`src/palikit/assets/demo-model`, replaced by
`python -m palikit.demo.evaluate --install` only in a source checkout)."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # the imported palikit package
ASSET_DIR = PACKAGE_DIR / "assets" / "demo-model"


def bundled_demo_model() -> Path | None:
    """The bundled demo model's folder (what `model=demo`, `--model demo` or no model means), or None
    when this install has none."""
    return ASSET_DIR if (ASSET_DIR / "config.json").exists() else None


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
    """`<checkout>/work/demo` (what the recipes under recipes/ read) in a source checkout; otherwise
    `$XDG_CACHE_HOME/palikit/demo` (default `~/.cache/palikit/demo`)."""
    root = source_checkout()
    if root is not None:
        return root / "work" / "demo"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "palikit" / "demo"


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
