"""Helpers for the server tests, in one place: a tiny random checkpoint, a REAL `palikit serve` process
on a free loopback port (`helpers.free_port`), the fixtures that start one (`server`: one server shared by the
test files of one pytest run; `server_fixture(*flags)`: a module's own), test images, and RSS readings.

Not a test module (no `test_` prefix); the server test files import it (fixtures too:
`from serve_helpers import server`).
"""

from __future__ import annotations

import atexit
import copy
import base64
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers import free_port
from PIL import Image

API_KEY = "sk-test-palikit-0123456789"
LAUNCH = "import sys; from palikit.cli import main; from palikit.cli import serve; sys.exit(main(sys.argv[1:]))"

_cache: dict = {}


def tiny_checkpoint() -> Path:
    if "ckpt" not in _cache:
        from palikit.testing import make_tiny_checkpoint

        folder = Path(tempfile.mkdtemp(prefix="palikit-serve-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _cache["ckpt"] = make_tiny_checkpoint(folder / "tiny", family="pg2")
    return _cache["ckpt"]


def reference_model():
    """The same checkpoint loaded in the test process: what the server's answers must equal."""
    if "pg" not in _cache:
        from palikit.api import PaliGemma

        _cache["pg"] = PaliGemma.from_pretrained(tiny_checkpoint(), device="cpu")
    return _cache["pg"]


class one_thread:
    """torch on one thread while computing expected answers (tiny models run ~10x faster on a busy
    2-core machine); restores the previous setting."""

    def __enter__(self):
        import torch

        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.n)


CHROMIUM = "/usr/bin/chromium"  # Debian's (scripts/setup-system.sh installs it)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


class Server:
    """`palikit serve` in a subprocess, bound to `host` (127.0.0.1) on a free port (port=0: the port
    the server chose, read from its start-up banner)."""

    def __init__(self, *args: str, api_keys: tuple[str, ...] = (API_KEY,), env: dict | None = None,
                 ready_timeout: float = 90.0, host: str = "127.0.0.1", port: int | None = None,
                 model: str | Path | None = None):
        import palikit

        self.host = host
        self.port = free_port() if port is None else port
        self.url = f"http://{host}:{self.port}"
        self.api_key = api_keys[0] if api_keys else None
        src = str(Path(palikit.__file__).resolve().parents[1])
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
                    "PALIKIT_API_KEYS": ",".join(api_keys), **(env or {})}
        self.log_path = Path(tempfile.mkstemp(prefix="palikit-serve-", suffix=".log")[1])
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, "-c", LAUNCH, "serve", "--model", str(model or tiny_checkpoint()), "--host", host,
               "--port", str(self.port), "--device", "cpu", "--log-level", "warning", "--torch-threads", "1", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
                                     start_new_session=True)
        atexit.register(self.stop)
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            if self.port == 0:
                self._port_from_banner()
            try:
                if self.port and httpx.get(self.url + "/readyz", timeout=2, headers=self.headers).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server not ready after {ready_timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def _port_from_banner(self) -> None:
        import re

        m = re.search(r"palikit: serving .* on http://\S+?:(\d+) ", self.log())
        if m:
            self.port = int(m.group(1))
            self.url = f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, **{"timeout": 60, **kw})

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except OSError:
            return ""

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        from palikit.testing import stop_process

        stop_process(self.proc, 10)
        if not self._log.closed:
            self._log.close()


def shared_server() -> Server:
    """One server (API key required) for all the normal server test files of this pytest run."""
    srv = _cache.get("server")
    if srv is None or not srv.alive():
        srv = _cache["server"] = Server("--max-upload-mb", "2")
    return srv


@pytest.fixture(scope="module")
def server() -> Server:
    """The shared server (`shared_server`)."""
    return shared_server()


@pytest.fixture(scope="module")
def pg():
    """The server's checkpoint loaded in the test process (`reference_model`)."""
    return reference_model()


def server_fixture(*flags: str):
    """A module-scoped fixture: a server of the module's own with these `palikit serve` flags, stopped
    after the module. `server = server_fixture("--max-slots", "4")`."""
    @pytest.fixture(scope="module")
    def own_server():
        srv = Server(*flags)
        yield srv
        srv.stop()

    return own_server


# ------------------------------------------------------------------------------ images
def png_bytes(w: int = 90, h: int = 60, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"


def bomb_png(side: int = 20000) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side pixels, all zero, that compresses
    to ~50 KB (the full image would need side*side bytes once decoded to RGB)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def comparable(d: dict) -> dict:
    """A Result dict without what legitimately differs between two runs (timings) or is server-only."""
    d = copy.deepcopy(d)  # its detections are popped from: the caller's dict stays whole
    d.pop("timings", None)
    d.pop("model", None)
    return d


def metric_samples(text: str, name: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def assert_same_result(got: dict, expected: dict) -> None:
    """Equal results: text, tokens, boxes, labels, masks exactly; log-probs and scores to float noise
    (a request batched with others runs through different matmul shapes than alone)."""
    import pytest

    got, expected = comparable(got), comparable(expected)
    for d in (got, expected):
        d["_lp"] = d.pop("token_logprobs") or []
        d["_scores"] = [(x.pop("score"), x.pop("mask_score")) for x in d["detections"]]
    assert got["_lp"] == pytest.approx(expected["_lp"], rel=1e-4, abs=1e-5)
    assert [[s if s is None else pytest.approx(s, rel=1e-4, abs=1e-5) for s in pair] for pair in expected["_scores"]] \
        == [list(p) for p in got["_scores"]]
    for d in (got, expected):
        del d["_lp"], d["_scores"]
    assert got == expected
