"""Issue 38's serving figures, re-measured on a real `palikit serve` (16 slots, the defaults):

- S1: the latency of a caption sent right after 64 clients sent 512-token /v1/predict requests and
  left after 0.3 s (target < 1 s);
- S2: the latency of a caption sent behind 32 beam requests (target: 200 in < 1 s), and of one sent
  after they all finished or timed out (`--timeout 2`);
- the server's peak RSS above its idle RSS while 4 concurrent 16-bit TIFFs are decoded.

`--src DIR` (repeatable) runs the same probe against another checkout's `src` (e.g. /work/main/src)
in the same run, for the before/after ratio. Prints one JSON line per checkout, then a summary line.
The model is a tiny random PaliGemma 2 checkpoint (palikit.testing): it writes every request out to
its token budget, as the red team's runs did; today's bundled demo model answers with EOS within a
few tokens whatever the prompt, so abandoned or beam work would cost it nothing to finish.

    python -m lab.probes.serve_redteam --src /work/main/src --src src
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _png(seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _tiff16(side: int = 4200) -> str:
    """A 16-bit greyscale TIFF of side x side pixels that deflates to a few hundred KB."""
    ramp = (np.add.outer(np.arange(side) // 300, np.arange(side) // 300) * 997 % 65536).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, "TIFF", compression="tiff_adobe_deflate")
    return base64.b64encode(buf.getvalue()).decode()


MODEL: list[str] = []  # the checkpoint folder, made once


def tiny_model() -> str:
    if not MODEL:
        from palikit.testing import make_tiny_checkpoint

        MODEL.append(str(make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="redteam-")) / "tiny", family="pg2")))
    return MODEL[0]


class Serve:
    def __init__(self, src: str, *flags: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(Path(src).resolve()), "PALIKIT_API_KEYS": ""}
        self.log = tempfile.NamedTemporaryFile(prefix="redteam-", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "palikit", "serve", "--model", tiny_model(), "--port", str(self.port),
               "--device", "cpu", "--log-level", "warning", *flags]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text()[-3000:])
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server not ready")
            time.sleep(0.3)

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)) / 1024

    def stop(self) -> None:
        from palikit.testing import stop_process

        stop_process(self.proc, 20)


def caption_s(srv: Serve, image: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    r = httpx.post(srv.url + "/v1/caption", json={"image": image, "max_new_tokens": 16}, timeout=120)
    return r.status_code, time.perf_counter() - t0


def leave_after(srv: Serve, body: dict, seconds: float) -> None:
    try:
        httpx.post(srv.url + "/v1/predict", json=body, timeout=seconds)
    except httpx.TimeoutException:
        pass


def probe_abandoned(src: str, image: str) -> dict:
    srv = Serve(src)
    try:
        body = {"image": image, "prompt": "caption en", "max_new_tokens": 512}
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            list(pool.map(lambda _: leave_after(srv, body, 0.3), range(64)))
        status, took = caption_s(srv, image)
        return {"caption_after_64_abandoned_s": round(took, 3), "status": status}
    finally:
        srv.stop()


def probe_beams(src: str, image: str) -> dict:
    srv = Serve(src, "--timeout", "2")
    try:
        body = {"image": image, "prompt": "caption en", "max_new_tokens": 128, "num_beams": 4}

        def beam(_):
            try:
                return httpx.post(srv.url + "/v1/predict", json=body, timeout=60).status_code
            except httpx.TransportError as e:
                return type(e).__name__

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            futures = [pool.submit(beam, i) for i in range(32)]
            time.sleep(0.5)
            status, took = caption_s(srv, image)
            beams = [f.result() for f in futures]
        status_after, took_after = caption_s(srv, image)
        return {"caption_behind_32_beams_s": round(took, 3), "status": status,
                "caption_after_beams_s": round(took_after, 3), "status_after": status_after,
                "beam_statuses": {str(k): beams.count(k) for k in set(beams)}}
    finally:
        srv.stop()


def probe_tiffs(src: str) -> dict:
    srv = Serve(src)
    try:
        tiff = _tiff16()
        time.sleep(1.0)
        idle = srv.rss_mb()
        peak, stop = [idle], threading.Event()

        def sample():
            while not stop.is_set():
                peak.append(srv.rss_mb())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = list(pool.map(lambda _: httpx.post(srv.url + "/v1/caption", json={"image": tiff,
                                                          "max_new_tokens": 4}, timeout=120).status_code, range(4)))
        stop.set()
        sampler.join()
        return {"tiff16_kb": round(len(tiff) * 3 / 4 / 1024), "tiff16_pixels": 4200 * 4200,
                "tiff16_x4_peak_over_idle_mb": round(max(peak) - idle), "idle_rss_mb": round(idle),
                "tiff_statuses": {str(k): statuses.count(k) for k in set(statuses)}}
    finally:
        srv.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", help="a checkout's src folder (repeatable; default: this one's)")
    args = ap.parse_args()
    image = _png()
    rows = []
    for src in args.src or ["src"]:
        row = {"src": src, **probe_abandoned(src, image), **probe_beams(src, image), **probe_tiffs(src)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    from palikit.runtime import cpu_model

    print(json.dumps({"cpu": cpu_model(), "cores": os.cpu_count(), "model": "tiny random pg2 (palikit.testing)",
                      "runs": len(rows)}))


if __name__ == "__main__":
    main()
