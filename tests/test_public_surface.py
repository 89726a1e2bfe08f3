"""The public surface: every name a module lists in `__all__` exists (`palikit.__all__` included, whose
names load lazily), `__version__` is the installed distribution's, and `import palikit` stays light."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import palikit

ROOT = Path(palikit.__file__).resolve().parent


def _modules_with_all() -> list[str]:
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        tree = ast.parse(p.read_text())
        if any(isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets)
               for n in tree.body):
            parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
            out.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return out


def test_modules_with_all_are_found():
    mods = _modules_with_all()
    assert "palikit" in mods and "palikit.tasks" in mods and "palikit.testing" in mods


@pytest.mark.parametrize("module", _modules_with_all())
def test_every_name_in_all_resolves(module):
    mod = importlib.import_module(module)
    missing = [name for name in mod.__all__ if not hasattr(mod, name)]
    assert not missing, f"{module}.__all__ names what it does not have: {missing}"
    assert len(set(mod.__all__)) == len(mod.__all__), f"{module}.__all__ lists a name twice"


def test_version_comes_from_the_package_metadata(monkeypatch):
    from importlib import metadata

    assert palikit.__version__ == metadata.version("palikit")

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    assert palikit._version() == "0+unknown"  # a source tree run without installing


@pytest.mark.slow  # a fresh interpreter
def test_import_palikit_stays_light():
    """The lazy names load nothing heavy until used: no torch, numpy or PIL at `import palikit`."""
    code = "import sys, palikit; print(sorted(m for m in ('torch', 'numpy', 'PIL') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
