"""Issue 17: the demo build writes to a user folder, never into the installed package, and
`python -m palikit.demo.evaluate --install` copies into src/palikit/assets/demo-model only from a
source checkout (a palikit in site-packages refuses, before the scorecard runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from palikit.demo import evaluate, paths
from palikit.demo.build import build

ROOT = Path(__file__).resolve().parent.parent


def test_build_refuses_a_folder_inside_the_package_and_defaults_to_the_checkout_work_folder():
    target = paths.PACKAGE_DIR / "assets" / "demo-build-test"
    with pytest.raises(ValueError, match=r"inside the palikit package .*give a folder outside it"):
        build(target, n_train=1, n_val=1, n_test=1, codec_images=1, codec_steps=1, progress=False)
    assert not target.exists()
    assert paths.source_checkout() == ROOT  # the tests run on the checkout's src/palikit
    assert paths.default_build_dir() == ROOT / "work" / "demo"  # what recipes/demo*.yaml read


def test_source_checkout_is_told_from_an_installed_package(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "src" / "palikit").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[project]\nname = 'palikit'\n")
    assert paths.source_checkout(repo / "src" / "palikit") == repo
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "palikit"
    site.mkdir(parents=True)
    assert paths.source_checkout(site) is None
    assert paths.source_checkout(tmp_path / "src" / "palikit") is None  # no pyproject.toml: not a checkout
    # outside a checkout the build goes to the user's cache folder
    monkeypatch.setattr(paths, "PACKAGE_DIR", site)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert paths.default_build_dir() == tmp_path / "cache" / "palikit" / "demo"
    model = tmp_path / "final"
    model.mkdir()
    for name in evaluate.REQUIRED_FILES:
        (model / name).write_text(name)
    good = {task: {metric: target + 0.05} for task, (metric, target) in evaluate.TARGETS.items()}
    dest = site / "assets" / "demo-model"
    with pytest.raises(ValueError, match=r"imported from an installed package .*pip install -e"):
        evaluate.install(model, good, dest)
    assert not dest.exists()
    assert evaluate.install(model, good, tmp_path / "elsewhere") == tmp_path / "elsewhere"  # outside the package: fine


def test_install_from_a_site_packages_palikit_refuses_before_scoring(tmp_path):
    """A copy of the package laid out as a non-editable install; `--install` exits with the reason
    (the --model folder does not even exist: the check comes before loading anything)."""
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    shutil.copytree(ROOT / "src" / "palikit", site / "palikit", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "palikit.demo.evaluate", "--install", "--model", str(tmp_path / "none")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: --install replaces the demo model of a source checkout" in proc.stderr
    assert str(site / "palikit") in proc.stderr and "Traceback" not in proc.stderr
    assert not (site / "palikit" / "assets").exists()
