"""Baselines `palikit eval` runs on the same samples as PaliGemma, with the same normalisation,
timing and cost rules: each is a small adapter with the interface the runner uses for `PaliGemma`.

The interface (what `evaluate` reads; only `predict_batch` is required):

- `predict_batch(images, prompts, labels=None, **opts) -> list` of results with `text`,
  `detections`, `errors`, optional `usage` ({prompt_tokens, completion_tokens}) and `failed`;
- `name`, `device_name` (what ran it, in words), `timed` (False: no speed figures, e.g. a results
  file), `needs_images` (False: a missing image file is no failure);
- `settings()` -> the adapter's choices, recorded in the report (Tesseract's page-segmentation
  mode, the endpoint, its prompts); `fingerprint()` -> refuses to resume another system's predictions;
- `prompt_template(task)` -> the prompt template this system gets for `task` (None: PaliGemma's);
- `price_rule(price_per_hour)` -> the price keywords of `evaluate` that apply to it;
- `bind(dataset)` -> called once with the `EvalDataset` before predicting.

Specs (`palikit eval --baseline SPEC`, `parse_baseline`):
- `tesseract` or `tesseract?psm=7&lang=eng`: Tesseract through pytesseract; psm 7 = "treat the
  image as a single text line", the mode for cropped words and codes;
- `easyocr[?lang=en&model_dir=DIR&venv=PATH&threads=N]`, `rapidocr[?threads=N&det=1]`: EasyOCR (in a
  venv of its own) and PaddleOCR's PP-OCR models through RapidOCR (`palikit.eval.baselines_ocr`);
- `openai:BASE_URL#MODEL` with optional `?key_env=OPENAI_API_KEY&prompts=chat|paligemma&concurrency=4
  &retries=4&timeout=60&max_tokens=64&price_in=2.5&price_out=10` (price_* in $ per million tokens):
  any OpenAI-compatible chat endpoint with image input, through the official `openai` client (its
  retries back off exponentially on 408 / 429 / 5xx / connection errors);
- `palikit:PATH`: another palikit checkpoint (e.g. before vs after fine-tuning);
- `coco-results:FILE`: a COCO detection results file ([{image_id, category_id, bbox [x, y, w, h],
  score}]) from any detector, scored like the model's detections (no speed figures).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .baseline_spec import BaselineError, spec_options
from .baselines_ocr import LocalOCR

CHAT_PROMPTS = {
    "ocr": "Read the text in this image. Reply with the text exactly as written and nothing else.",
    "vqa": "{question}\nAnswer with a single word or a short phrase.",
    "exact": "{question}\nAnswer with a single word or a short phrase.",
    "anls": "{question}\nAnswer with the exact text from the image.",
    "count": "{question}\nAnswer with a number only.",
    "caption": "Describe this image in one short sentence.",
}


class Tesseract(LocalOCR):
    """Tesseract OCR via pytesseract. `psm` 7 treats the crop as one text line (cropped words and
    codes); 6 = a block of text, 8 = a single word, 13 = raw line. Lines of the output are joined by
    a space; the runner's normalisation (case, whitespace) is then the same as for every model."""

    def __init__(self, psm: int = 7, lang: str = "eng", oem: int | None = None):
        try:
            import pytesseract
        except ImportError as e:
            raise BaselineError("the tesseract baseline needs pytesseract: pip install 'palikit[eval]' "
                                "(and the tesseract binary: apt-get install tesseract-ocr tesseract-ocr-eng)") from e
        try:
            self.version = str(pytesseract.get_tesseract_version())
        except pytesseract.TesseractNotFoundError as e:
            raise BaselineError("the tesseract binary is not installed: apt-get install tesseract-ocr "
                                "tesseract-ocr-eng (or brew install tesseract)") from e
        langs = pytesseract.get_languages(config="")
        if lang not in langs:
            raise BaselineError(f"tesseract has no '{lang}' language data (has {', '.join(langs)}); "
                                f"apt-get install tesseract-ocr-{lang}")
        self._tess = pytesseract
        self.psm, self.lang, self.oem = int(psm), lang, oem
        self.name = "tesseract" + ("" if self.psm == 7 else f" psm {self.psm}")
        self.device_name = f"cpu ({os.cpu_count()} cores; tesseract {self.version}, one image at a time)"
        self.threads = f"OMP_THREAD_LIMIT={os.environ.get('OMP_THREAD_LIMIT', 'unset (tesseract default)')}"

    @property
    def config(self) -> str:
        return f"--psm {self.psm}" + (f" --oem {self.oem}" if self.oem is not None else "")

    def settings(self) -> dict[str, Any]:
        return {"engine": f"tesseract {self.version} via pytesseract", "psm": self.psm, "lang": self.lang,
                "oem": self.oem if self.oem is not None else "default", "config": self.config,
                "OMP_THREAD_LIMIT": os.environ.get("OMP_THREAD_LIMIT", "unset"),
                "output": "lines joined by one space, ends stripped"}

    def fingerprint(self) -> str:
        return f"tesseract-{self.version}-{self.lang}-{self.config}"

    def read(self, image: Any) -> str:
        from PIL import Image

        img = image if isinstance(image, Image.Image) else Image.open(image)
        text = self._tess.image_to_string(img.convert("RGB"), lang=self.lang, config=self.config)
        return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _data_url(image: Any) -> str:
    from PIL import Image

    if isinstance(image, Image.Image):
        import io

        buf = io.BytesIO()
        image.save(buf, "PNG")
        data, mime = buf.getvalue(), "image/png"
    else:
        data = Path(image).read_bytes()
        with Image.open(image) as im:
            mime = Image.MIME.get(im.format or "PNG", "image/png")
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class OpenAIChat:
    """Any OpenAI-compatible chat endpoint with image input (vLLM, TGI, a hosted API, `palikit
    serve`). One request per sample, `concurrency` in flight; the key comes from the environment
    variable `key_env`. `prompts="chat"` sends `CHAT_PROMPTS[task]` (an instruction a chat VLM
    follows); `"paligemma"` sends PaliGemma's own task prompt (`ocr`, `caption en`...), for endpoints
    that serve a PaliGemma. Cost: token usage the endpoint reports x `price_in` / `price_out`."""

    timed = True
    needs_images = True

    def __init__(self, base_url: str, model: str, *, key_env: str = "OPENAI_API_KEY", prompts: str = "chat",
                 concurrency: int = 4, retries: int = 4, timeout: float = 60.0, max_tokens: int = 64,
                 price_in: float | None = None, price_out: float | None = None):
        try:
            import openai
        except ImportError as e:
            raise BaselineError("the openai baseline needs the official client: pip install 'palikit[eval]' "
                                "(or pip install openai)") from e

        if not base_url.startswith(("http://", "https://")):
            raise BaselineError(f"openai baseline: BASE_URL must start with http:// or https://, got {base_url!r} "
                                "(spec: openai:http://host:port/v1#MODEL)")
        if prompts not in ("chat", "paligemma"):
            raise BaselineError(f"openai baseline: prompts must be 'chat' or 'paligemma', got {prompts!r}")
        if (price_in is None) != (price_out is None):
            raise BaselineError("openai baseline: give both price_in and price_out ($ per million tokens) or neither")
        key = os.environ.get(key_env)
        if key is None and key_env != "OPENAI_API_KEY":
            raise BaselineError(f"openai baseline: the environment variable {key_env} (the API key) is not set")
        self.base_url, self.model, self.key_env, self.prompts = base_url, model, key_env, prompts
        self.concurrency, self.retries, self.timeout = max(1, int(concurrency)), int(retries), float(timeout)
        self.max_tokens = int(max_tokens)
        self.price_in, self.price_out = price_in, price_out
        self.client = openai.OpenAI(base_url=base_url, api_key=key or "no-key", max_retries=self.retries,
                                    timeout=self.timeout)
        self.name = f"{model} (openai API)"
        self.device_name = f"remote endpoint {base_url} (its own hardware)"
        self.batch_size = 2 * self.concurrency
        self.threads = f"remote; {self.concurrency} requests in flight"

    def settings(self) -> dict[str, Any]:
        return {"base_url": self.base_url, "model": self.model, "api_key_env": self.key_env,
                "prompts": self.prompts, "concurrency": self.concurrency,
                "retries": f"{self.retries} (openai client: exponential backoff on 408/429/5xx/connection errors)",
                "timeout_s": self.timeout, "max_tokens": self.max_tokens, "temperature": 0,
                "price_per_mtok": None if self.price_in is None else {"input": self.price_in, "output": self.price_out}}

    def fingerprint(self) -> str:
        return f"openai:{self.base_url}#{self.model}:{self.prompts}"

    def prompt_template(self, task: str) -> str | None:
        if self.prompts == "paligemma":
            return None
        if task not in CHAT_PROMPTS:
            raise BaselineError(f"the openai baseline has no chat prompt for {task} (tasks: "
                                f"{', '.join(CHAT_PROMPTS)}); for a PaliGemma endpoint add ?prompts=paligemma")
        return CHAT_PROMPTS[task]

    def price_rule(self, price_per_hour: float | None) -> dict[str, Any]:
        return {"price_per_mtok": None if self.price_in is None else (self.price_in, self.price_out)}

    def ask(self, image: Any, prompt: str) -> dict[str, Any]:
        import openai

        t0 = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(
                model=self.model, max_tokens=self.max_tokens, temperature=0,
                messages=[{"role": "user", "content": [{"type": "text", "text": prompt},
                                                       {"type": "image_url", "image_url": {"url": _data_url(image)}}]}])
        except (openai.OpenAIError, OSError) as e:
            return {"text": "", "errors": [f"{type(e).__name__}: {e}"], "failed": True}
        out: dict[str, Any] = {"text": (resp.choices[0].message.content or "").strip() if resp.choices else "",
                               "timings": {"request_ms": (time.perf_counter() - t0) * 1e3}}
        if resp.usage is not None:
            out["usage"] = {"prompt_tokens": resp.usage.prompt_tokens or 0,
                            "completion_tokens": resp.usage.completion_tokens or 0}
        return out

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], labels=None, **opts) -> list[dict]:
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(images))) as pool:
            return list(pool.map(self.ask, images, prompts))


class COCOResults:
    """Detections of any detector from a COCO results file, mapped onto the dataset's images by
    image id and onto labels by category id. Not timed: speed and cost stay empty."""

    timed = False
    needs_images = False
    device_name = "precomputed (COCO results file)"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            rows = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise BaselineError(f"coco-results: no file {self.path}") from None
        except json.JSONDecodeError as e:
            raise BaselineError(f"coco-results: {self.path} is not JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(rows, list):
            raise BaselineError(f"coco-results: {self.path} must hold a JSON list of detections")
        for i, r in enumerate(rows):
            ok = isinstance(r, Mapping) and all(k in r for k in ("image_id", "category_id", "bbox")) \
                and isinstance(r["bbox"], list) and len(r["bbox"]) == 4
            if not ok:
                raise BaselineError(f"coco-results: {self.path} entry #{i} needs image_id, category_id and "
                                    f"bbox [x, y, w, h] (got {str(r)[:80]})")
        self.rows = rows
        self.name = f"coco-results:{self.path.name}"
        self._by_image: dict[str, list[dict]] = {}

    def settings(self) -> dict[str, Any]:
        return {"file": str(self.path), "detections": len(self.rows)}

    def fingerprint(self) -> str:
        return "coco-results-" + hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    def prompt_template(self, task: str) -> str | None:
        if task != "detect":
            raise BaselineError(f"coco-results baselines score detection only (--task detect), not {task}")
        return None

    def price_rule(self, price_per_hour: float | None) -> dict[str, Any]:
        return {}

    def bind(self, dataset: Any) -> None:
        if dataset.coco is None:
            raise BaselineError("coco-results needs a COCO json dataset (the image ids and categories)")
        names = {c["id"]: c["name"] for c in dataset.coco["categories"]}
        unknown = sorted({r["category_id"] for r in self.rows} - set(names), key=str)
        if unknown:
            raise BaselineError(f"coco-results: {self.path} uses category ids {unknown} that the dataset does not "
                                f"have (it has {sorted(names)})")
        by_id: dict[Any, list[dict]] = {}
        for r in self.rows:
            x, y, w, h = (float(v) for v in r["bbox"])
            by_id.setdefault(r["image_id"], []).append({"label": names[r["category_id"]], "box": [x, y, x + w, y + h],
                                                        "score": float(r.get("score", 1.0))})
        self._by_image = {s.image: by_id.get(s.meta.get("image_id"), []) for s in dataset.samples}

    def predict_batch(self, images: Sequence[Any], prompts: Sequence[str], labels=None, **opts) -> list[dict]:
        return [{"text": "", "detections": self._by_image.get(str(im), [])} for im in images]


def parse_baseline(spec: str, *, device: str = "auto", dtype: str = "auto") -> Any:
    """An adapter from a `--baseline` spec (module docstring)."""
    kind, _, rest = spec.partition(":")
    if spec == "tesseract" or spec.startswith("tesseract?"):
        return Tesseract(**spec_options(spec.partition("?")[2], {"psm": int, "lang": str, "oem": int}, spec))
    if spec.partition("?")[0] in ("easyocr", "rapidocr"):
        from .baselines_ocr import parse_engine

        return parse_engine(spec)
    if kind == "openai":
        target, _, query = rest.partition("?")
        base_url, _, model = target.partition("#")
        if not base_url or not model:
            raise BaselineError(f"baseline {spec!r}: write openai:BASE_URL#MODEL, e.g. openai:http://127.0.0.1:8000/v1#demo")
        opts = spec_options(query, {"key_env": str, "prompts": str, "concurrency": int, "retries": int, "timeout": float,
                                "max_tokens": int, "price_in": float, "price_out": float}, spec)
        return OpenAIChat(base_url, model, **opts)
    if kind == "palikit" and rest:
        from ..api import PaliGemma

        pg = PaliGemma.from_pretrained(rest, device=device, dtype=dtype)
        pg.name = f"palikit:{rest}"
        return pg
    if kind == "coco-results" and rest:
        return COCOResults(rest)
    raise BaselineError(f"unknown baseline {spec!r}: use tesseract, easyocr, rapidocr, openai:BASE_URL#MODEL, "
                        "palikit:PATH or coco-results:FILE")
