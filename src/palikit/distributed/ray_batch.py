"""Batch inference past one machine on Ray Data: inputs are read and decoded + preprocessed by CPU
tasks, the model runs in an actor pool (one replica per GPU, or CPU workers), and every actor
writes its results itself, atomically, one part file per batch (`part-*.jsonl` or `.parquet`,
each row keyed by the input id). A rerun reads the part files already there and skips their ids,
so a killed job resumes and every input ends up written exactly once. An image that fails to
decode is written with its error instead of stopping the job.

Runs on a local Ray (started on demand, no set-up) or on a cluster given its address.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TASKS = ("ocr", "caption", "describe", "detect", "segment", "answer", "predict")


@dataclass
class BatchSummary:
    total: int
    skipped: int  # already written by an earlier run
    written: int
    failed: int
    seconds: float
    output: str

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


# ----------------------------------------------------------------------------------- inputs
def read_inputs(source: str | Path) -> list[dict[str, Any]]:
    """Rows {"id", "image" (path or bytes), optional "prompt" / "question" / "labels"} from a folder
    of images, a JSONL file or a Parquet file."""
    source = Path(source)
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        return [{"id": str(p.relative_to(source)), "image": str(p)} for p in files]
    if source.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(source.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}:{n}: not valid JSON ({e.msg})") from None
            if "image" not in row:
                raise ValueError(f"{source}:{n}: missing the 'image' field")
            img = row["image"]
            if isinstance(img, str) and not Path(img).is_absolute():
                row["image"] = str(source.parent / img)
            row.setdefault("id", str(n))
            row["id"] = str(row["id"])
            rows.append(row)
        return rows
    if source.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(source).to_pylist()
        for n, row in enumerate(table):
            if "image" not in row:
                raise ValueError(f"{source}: row {n} has no 'image' column")
            row["id"] = str(row.get("id", n))
        return table
    raise ValueError(f"--input must be a folder of images, a .jsonl or a .parquet file; got {source}")


def done_ids(output: str | Path) -> set[str]:
    """Ids already written by complete part files (temporary files of a killed run are ignored)."""
    output = Path(output)
    ids: set[str] = set()
    if not output.exists():
        return ids
    for part in output.glob("part-*.jsonl"):
        for line in part.read_text().splitlines():
            if line.strip():
                ids.add(json.loads(line)["id"])
    parquet = list(output.glob("part-*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        for part in parquet:
            ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def read_results(output: str | Path) -> list[dict[str, Any]]:
    """All result rows, one per input id (a batch Ray retried after a worker died mid-way can be in
    two parts; the first copy wins)."""
    output = Path(output)
    rows: list[dict[str, Any]] = []
    for part in sorted(output.glob("part-*.jsonl")):
        rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
    parquet = sorted(output.glob("part-*.parquet"))
    if parquet:
        import pyarrow.parquet as pq

        for part in parquet:
            rows += pq.read_table(part).to_pylist()
    seen: set[str] = set()
    unique = []
    for r in rows:
        if r["id"] not in seen:
            seen.add(r["id"])
            unique.append(r)
    return unique


def prompt_for(task: str, row: dict[str, Any], *, labels: list[str] | None, question: str | None, prompt: str | None,
               lang: str) -> str:
    from ..tasks import prompts

    if task == "ocr":
        return prompts.ocr()
    if task in ("caption", "describe"):
        return getattr(prompts, task)(lang)
    if task in ("detect", "segment"):
        row_labels = row.get("labels") or labels
        if not row_labels:
            raise ValueError(f"task {task} needs labels (--labels or a 'labels' field per row)")
        return getattr(prompts, task)(list(row_labels))
    if task == "answer":
        q = row.get("question") or question
        if not q:
            raise ValueError("task answer needs a question (--question or a 'question' field per row)")
        return prompts.answer(q, lang)
    p = row.get("prompt") or prompt
    if p is None:
        raise ValueError("task predict needs a prompt (--prompt or a 'prompt' field per row)")
    return p


# ----------------------------------------------------------------------------------- stages
def _preprocess_fn(image_size: int, preprocessor_dir: str | None):
    """CPU stage (plain Ray tasks, scaled by Ray): decode + resize; failures become error rows."""

    def preprocess(batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from ..preprocess import ImageProcessor

        proc = (ImageProcessor.from_pretrained(preprocessor_dir, default_size=image_size) if preprocessor_dir
                else ImageProcessor(size=image_size))
        S = proc.size
        pixels, widths, heights, errors = [], [], [], []
        for image in batch["image"]:
            try:
                pv, sizes = proc.preprocess_with_sizes([image])
                pixels.append(pv[0].numpy())
                widths.append(sizes[0][0])
                heights.append(sizes[0][1])
                errors.append("")
            except Exception as e:  # noqa: BLE001 - recorded per input, never stops the job
                pixels.append(np.zeros((3, S, S), dtype=np.float32))
                widths.append(0)
                heights.append(0)
                errors.append(f"{type(e).__name__}: {e}")
        return {"id": batch["id"], "prompt": batch["prompt"], "pixels": np.stack(pixels),
                "width": np.array(widths), "height": np.array(heights), "error": np.array(errors, dtype=object)}

    return preprocess


class _Predictor:
    """Actor: loads the model once, predicts a batch, writes its part file atomically."""

    def __init__(self, model: str, device: str, dtype: str, output: str, fmt: str, options: dict):
        from ..api import PaliGemma

        self.pg = PaliGemma.from_pretrained(model, device=device, dtype=dtype)
        self.output, self.fmt, self.options = Path(output), fmt, options

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        ok = [i for i, e in enumerate(batch["error"]) if not e]
        rows: dict[int, dict[str, Any]] = {}
        if ok:
            pv = torch.from_numpy(batch["pixels"][ok])
            sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in ok]
            results = self.pg.predict_pixels(pv, sizes, [batch["prompt"][i] for i in ok], **self.options)
            for i, r in zip(ok, results):
                d = r.to_dict()
                rows[i] = {"id": batch["id"][i], "prompt": r.prompt, "text": r.text,
                           "detections": json.dumps(d.get("detections", [])), "error": ""}
        for i, e in enumerate(batch["error"]):
            if e:
                rows[i] = {"id": batch["id"][i], "prompt": batch["prompt"][i], "text": "", "detections": "[]", "error": e}
        ordered = [rows[i] for i in range(len(batch["id"]))]
        _write_part(self.output, ordered, self.fmt)
        return {"id": batch["id"], "failed": [bool(e) for e in batch["error"]]}


def _write_part(output: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    output.mkdir(parents=True, exist_ok=True)
    name = f"part-{uuid.uuid4().hex}.{fmt}"
    tmp = output / f".{name}.tmp"
    if fmt == "jsonl":
        with open(tmp, "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
            f.flush()
            os.fsync(f.fileno())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    os.replace(tmp, output / name)  # a part is either complete or absent


# ----------------------------------------------------------------------------------- driver
def run_batch(
    input: str | Path,
    output: str | Path,
    task: str,
    model: str,
    *,
    labels: Iterable[str] | None = None,
    question: str | None = None,
    prompt: str | None = None,
    lang: str = "en",
    fmt: str = "jsonl",
    batch_size: int = 8,
    num_workers: int = 1,
    device: str = "auto",
    dtype: str = "auto",
    address: str | None = None,
    max_new_tokens: int = 64,
    progress: bool = True,
) -> BatchSummary:
    import time

    import ray

    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError("format must be jsonl or parquet")
    from ..api import PaliGemma  # noqa: F401 - fail fast on a broken install, before Ray starts
    from ..weights.resolve import image_size_of, resolve

    files = resolve(model)
    image_size = image_size_of(files)  # from config.json or the .npz's shapes (224, 448, 896, ...)
    rows = read_inputs(input)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("input ids are not unique; give each row an 'id'")
    done = done_ids(output)
    todo = [r for r in rows if r["id"] not in done]
    for r in todo:
        r["prompt"] = prompt_for(task, r, labels=list(labels) if labels else None, question=question, prompt=prompt, lang=lang)
        if isinstance(r["image"], Path):
            r["image"] = str(r["image"])
    t0 = time.perf_counter()
    failed = 0
    if todo:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
        ray.data.DataContext.get_current().enable_progress_bars = progress
        use_gpu = device in ("cuda", "auto") and ray.cluster_resources().get("GPU", 0) > 0
        ds = ray.data.from_items([{"id": r["id"], "image": r["image"], "prompt": r["prompt"]} for r in todo])
        ds = ds.map_batches(_preprocess_fn(image_size, str(files.preprocessor) if files.preprocessor else None),
                            batch_size=batch_size, batch_format="numpy")
        ds = ds.map_batches(
            _Predictor,
            fn_constructor_args=(str(files.weights if files.format == "hf" else model), "cuda" if use_gpu else "cpu", dtype,
                                 str(output), fmt, {"max_new_tokens": max_new_tokens}),
            batch_size=batch_size, concurrency=num_workers, num_gpus=1 if use_gpu else 0, batch_format="numpy",
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            failed += int(sum(batch["failed"]))
    return BatchSummary(total=len(rows), skipped=len(rows) - len(todo), written=len(todo), failed=failed,
                        seconds=time.perf_counter() - t0, output=str(output))
