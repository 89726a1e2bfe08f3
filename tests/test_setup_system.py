"""scripts/setup-system.sh, the system half of `make test`'s set-up: a no-op when chromium and Tesseract
(with English) are there, else an install (root + apt) or an immediate failure naming the command."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # needs the system packages `make test` sets up

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "setup-system.sh"


def _run(*args, **env):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_everything_present_after_make_tests_setup_is_a_quiet_no_op():
    done = _run("--check")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_missing_package_fails_at_once_with_the_command_to_run():
    done = _run("--check", PALIKIT_CHROMIUM="/nonexistent/chromium")
    assert done.returncode == 1
    assert "needs the system packages chromium;" in done.stderr
    assert "apt-get update && apt-get install -y --no-install-recommends chromium'" in done.stderr


def test_make_test_runs_the_setup_before_pytest_and_ci_calls_make_test():
    plan = subprocess.run(["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.splitlines()
    steps = [i for i, line in enumerate(plan) if "setup-system.sh" in line or "pytest" in line]
    assert [("setup" in plan[i]) for i in steps] == [True, False]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get" not in ci
