"""Issue 17: the demo build writes to a user folder, never into the installed package, and
`python -m lab.demo.evaluate --install` copies into src/palikit/assets/demo-model only from a
source checkout (a palikit in site-packages refuses, before the scorecard runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from lab.demo import evaluate, paths
from lab.demo.build import build

ROOT = paths.CHECKOUT


def test_build_refuses_a_folder_inside_the_package_and_defaults_to_the_checkout_work_folder():
    target = paths.PACKAGE_DIR / "assets" / "demo-build-test"
    with pytest.raises(ValueError, match=r"inside the palikit package .*give a folder outside it"):
        build(target, n_train=1, n_val=1, n_test=1, codec_images=1, codec_steps=1, progress=False)
    assert not target.exists()
    assert paths.source_checkout() == ROOT  # the tests run on the checkout's src/palikit
    assert paths.default_build_dir() == ROOT / "work" / "demo"  # what lab/recipes/demo*.yaml read


def test_source_checkout_is_told_from_an_installed_package(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    (repo / "src" / "palikit").mkdir(parents=True)
    (repo / "pyproject.toml").write_text("[project]\nname = 'palikit'\n")
    assert paths.source_checkout(repo / "src" / "palikit") == repo
    site = tmp_path / "lib" / "python3.11" / "site-packages" / "palikit"
    site.mkdir(parents=True)
    assert paths.source_checkout(site) is None
    assert paths.source_checkout(tmp_path / "src" / "palikit") is None  # no pyproject.toml: not a checkout
    monkeypatch.setattr(paths, "PACKAGE_DIR", site)  # a palikit in site-packages: --install refuses
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


@pytest.mark.slow  # a copy of the package and a process
def test_install_from_a_site_packages_palikit_refuses_before_scoring(tmp_path):
    """A copy of the package laid out as a non-editable install; `--install` exits with the reason
    (the --model folder does not even exist: the check comes before loading anything)."""
    site = tmp_path / "lib" / "python3.11" / "site-packages"
    shutil.copytree(ROOT / "src" / "palikit", site / "palikit", ignore=shutil.ignore_patterns("assets", "__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lab.demo.evaluate", "--install", "--model", str(tmp_path / "none")],
                          env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)  # lab: the checkout
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: --install replaces the demo model of a source checkout" in proc.stderr
    assert str(site / "palikit") in proc.stderr and "Traceback" not in proc.stderr
    assert not (site / "palikit" / "assets").exists()
