"""Batch inference past one machine on Ray Data: inputs are read and decoded + preprocessed by CPU
tasks, the model runs in an actor pool (one replica per GPU, or CPU workers), and every actor
writes its results itself, atomically, one part file per batch (`part-*.jsonl` or `.parquet`).
Each row carries the input id, the task and a `key`: a hash of the task, the row's prompt, the
generation options and the model. A rerun skips the (id, key) pairs already written, so a killed
job resumes and writes every input exactly once, while another task or other options into the same
folder run in full. An image that fails to decode is written with its error instead of stopping the
job; `retry_failed` runs those inputs again (after the file was fixed). Detections are structured
columns (a list of {label, box, score, mask_score, mask}), not JSON text. Ctrl-C / SIGTERM: the
parts written so far stay, the summary says how to resume, the CLI exits 130 / 143.

Runs on a local Ray (started on demand, no set-up, its node on 127.0.0.1) or on a cluster given its
address.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
TASKS = ("ocr", "caption", "describe", "detect", "segment", "answer", "predict")  # at import; see ray_tasks()


@dataclass
class BatchSummary:
    total: int
    skipped: int  # already written by an earlier run
    written: int
    failed: int
    seconds: float
    output: str
    interrupted: str | None = None  # "SIGINT" / "SIGTERM" when the run was stopped early
    adapters: dict[str, int] = field(default_factory=dict)  # rows written per adapter (several-adapter runs)

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
        from ..datafiles import DataError, Problem, read_jsonl_rows

        found, problems = read_jsonl_rows(source)
        rows = []
        for n, row in found:
            why = row_problem(row)
            if why:
                problems.append(Problem(str(source), f"line {n}", why))
                continue
            if not Path(row["image"]).is_absolute():
                row["image"] = str(source.parent / row["image"])
            row.setdefault("id", str(n))
            row["id"] = str(row["id"])
            rows.append(row)
        if problems:  # every bad row at once, before Ray starts or a model loads
            raise DataError(sorted(problems, key=lambda p: int(p.where[5:]) if p.where[5:].isdigit() else 0),
                            f"batch input {source}", hint="correct or remove those rows")
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


ROW_TEXT_FIELDS = ("id", "prompt", "question", "lang")


def row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with a JSONL input row (None: nothing): `image` must be a path string, `id`,
    `prompt`, `question` text (an id may be a number), `labels` a string or a list of strings."""
    if "image" not in row:
        return "missing the 'image' field (a path to the image file)"
    if not isinstance(row["image"], str) or not row["image"].strip():
        return f"'image' must be a path string, got {type(row['image']).__name__} {str(row['image'])[:40]!r}"
    for key in ROW_TEXT_FIELDS:
        v = row.get(key)
        if v is not None and not isinstance(v, str) and not (key == "id" and isinstance(v, int)):
            return f"'{key}' must be a string, got {type(v).__name__}"
    labels = row.get("labels")
    if labels is not None and not (isinstance(labels, str) or (isinstance(labels, list)
                                                                and all(isinstance(x, str) for x in labels))):
        return f"'labels' must be a string ('cat ; dog') or a list of strings, got {type(labels).__name__}"
    return None


def check_output(output: str | Path) -> None:
    """The output folder exists (created) and a file can be written in it: found before Ray starts and
    the model loads, not after the first batch."""
    import tempfile

    out = Path(output)
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".palikit-write-check-"):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write results to --output {out} ({e.strerror or e}); choose a folder you can "
                              "write to") from None


def row_key(task: str, prompt: str, options: dict[str, Any], model: str) -> str:
    """What makes a result reusable: the same task, prompt, options and model."""
    blob = json.dumps([task, prompt, sorted(options.items()), model], default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _all_rows(output: str | Path, columns: list[str] | None = None, newer_than: float | None = None
              ) -> list[dict[str, Any]]:
    """Rows of every complete part file (or of those written after `newer_than`, a time.time()), oldest
    part first; temporary files of a killed run are ignored."""
    output = Path(output)
    if not output.exists():
        return []
    parts = sorted(list(output.glob("part-*.jsonl")) + list(output.glob("part-*.parquet")), key=_mtime)
    if newer_than is not None:
        parts = [p for p in parts if p.stat().st_mtime >= newer_than]
    rows: list[dict[str, Any]] = []
    for part in parts:
        if part.suffix == ".jsonl":
            rows += [json.loads(line) for line in part.read_text().splitlines() if line.strip()]
        else:
            import pyarrow.parquet as pq

            names = pq.read_schema(part).names
            rows += pq.read_table(part, columns=[c for c in columns if c in names] if columns else None).to_pylist()
    return rows


def _mtime(p: Path) -> tuple[float, str]:
    return (p.stat().st_mtime, p.name)


def done_ids(output: str | Path) -> set[str]:
    """Ids written by complete part files, for any task."""
    return {r["id"] for r in _all_rows(output, ["id"])}


def done_keys(output: str | Path, *, retry_failed: bool = False) -> set[tuple[str, str]]:
    """(id, key) pairs already written; with `retry_failed`, only those written without an error."""
    return {(r["id"], r.get("key")) for r in _all_rows(output, ["id", "key", "error"])
            if not (retry_failed and r.get("error"))}


def read_results(output: str | Path, task: str | None = None) -> list[dict[str, Any]]:
    """One row per (input id, key), optionally only `task`'s. A successful row wins over an error row
    of the same pair (a --retry-failed rerun), else the first copy (a batch Ray retried after a worker
    died mid-way can be in two parts)."""
    best: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in _all_rows(output):
        if task is not None and r.get("task") != task:
            continue
        k = (r["id"], r.get("key"))
        if k not in best or (best[k].get("error") and not r.get("error")):
            best[k] = r
    return list(best.values())


def prompt_for(task: str, row: dict[str, Any], *, lang: str = "en", **values: Any) -> tuple[str, list[str] | None]:
    """(prompt, requested labels) of one input row for a task of the task table: each task argument
    comes from the row's field of that name, else from `values` (the `--labels` / `--question` /
    `--prompt` given for the whole run); labels by the one label rule (`tasks.labels`)."""
    from ..tasks.registry import get_task

    t = get_task(task)
    given = {}
    for a in t.args:
        v = row.get(a.name) or values.get(a.name)
        if a.required and not v:
            raise ValueError(f"task {task} needs {a.what} (--{a.name} or a '{a.name}' field per row)")
        given[a.name] = v
    return t.prompt(given, lang)


def ray_tasks() -> tuple[str, ...]:
    """The tasks `run_batch` runs: the Ray entries of the task table."""
    from ..tasks.registry import tasks_where

    return tuple(t.name for t in tasks_where("ray"))


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
        return {"id": batch["id"], "key": batch["key"], "prompt": batch["prompt"], "labels": batch["labels"],
                "adapter": batch["adapter"], "pixels": np.stack(pixels),
                "width": np.array(widths), "height": np.array(heights), "error": np.array(errors, dtype=object)}

    return preprocess


class _Predictor:
    """Actor: loads the model once, predicts a batch, writes its part file atomically."""

    def __init__(self, model: str, device: str, dtype: str, output: str, fmt: str, options: dict, task: str,
                 adapter: str | None = None, quantize: str | None = None, adapters: dict[str, str] | None = None):
        from ..api import PaliGemma

        self.pg = PaliGemma.from_pretrained(model, device=device, dtype=dtype, adapter=adapter, quantize=quantize,
                                            adapters=adapters, max_lora_rank=_max_rank(adapters))
        self.output, self.fmt, self.options, self.task = Path(output), fmt, options, task
        self.named = bool(adapters)  # rows carry an "adapter" column

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import torch

        from ..tasks.records import PredictionRecord

        rows: dict[int, dict[str, Any]] = {}
        groups: dict[str, list[int]] = {}  # adapter name ("" = the model as loaded) -> its ok rows
        for i, e in enumerate(batch["error"]):
            if not e:
                groups.setdefault(str(batch["adapter"][i]), []).append(i)

        def predict(name: str, ok: list[int]) -> list:
            sizes = [(int(batch["width"][i]), int(batch["height"][i])) for i in ok]
            labels = [json.loads(batch["labels"][i]) if batch["labels"][i] else None for i in ok]
            return self.pg.predict_pixels(torch.from_numpy(batch["pixels"][ok]), sizes,
                                          [batch["prompt"][i] for i in ok], labels=labels, adapter=name or None,
                                          **self.options)

        # one caller per adapter at once: the engine batches every adapter's rows together (multi-LoRA)
        with ThreadPoolExecutor(max(len(groups), 1)) as pool:
            done = {name: pool.submit(predict, name, ok) for name, ok in groups.items()}
        for name, ok in groups.items():
            for i, r in zip(ok, done[name].result()):
                rows[i] = PredictionRecord.from_result(batch["id"][i], batch["prompt"][i], r, task=self.task,
                                                       key=str(batch["key"][i])).batch_row()
        for i, e in enumerate(batch["error"]):
            if e:
                rows[i] = PredictionRecord.failure(batch["id"][i], batch["prompt"][i], e, task=self.task,
                                                   key=str(batch["key"][i])).batch_row()
        ordered = [rows[i] for i in range(len(batch["id"]))]
        if self.named:
            for i, row in enumerate(ordered):
                row["adapter"] = str(batch["adapter"][i])
        _write_part(self.output, ordered, self.fmt)
        return {"id": batch["id"], "failed": [bool(e) for e in batch["error"]]}


def detection_columns(result) -> list[dict[str, Any]]:
    """A result's detections as structured values (Parquet: a list of structs): label, box [x0, y0, x1,
    y1] in pixels of the original image, score, mask_score, mask (COCO RLE {size, counts} or None);
    the detections of `tasks.records.PredictionRecord.batch_row`."""
    from ..tasks.records import detection_record

    return [detection_record(d) for d in result.detections]


def _write_part(output: Path, rows: list[dict[str, Any]], fmt: str) -> None:
    from ..fileio import atomic_write_bytes

    if fmt == "jsonl":
        data: str | bytes = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        buf = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buf)
        data = buf.getvalue().to_pybytes()
    atomic_write_bytes(output / f"part-{uuid.uuid4().hex}.{fmt}", data)  # a part is either complete or absent


# ----------------------------------------------------------------------------------- driver
def run_batch(
    input: str | Path,
    output: str | Path,
    task: str,
    model: str,
    *,
    labels: Iterable[str] | str | None = None,
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
    retry_failed: bool = False,
    adapter: str | Path | None = None,
    quantize: str | None = None,
    adapters: dict[str, str | Path] | None = None,
) -> BatchSummary:
    """Run `task` over every input not yet written for this task, prompt, options and model (see the
    module docstring); `retry_failed` also reruns inputs whose earlier row is an error. `adapter`: a
    LoRA adapter folder (PEFT format) merged into `model` by every worker (part of the resume key).
    `adapters` {name: folder}: several adapters in one run, served unmerged side by side (multi-LoRA):
    every input runs once per adapter, one row each with an `adapter` column (its own resume key)."""
    import time

    if task not in ray_tasks():
        raise ValueError(f"task must be one of {', '.join(ray_tasks())}, got {task!r}")
    if fmt not in ("jsonl", "parquet"):
        raise ValueError("format must be jsonl or parquet")
    from ..api import PaliGemma  # noqa: F401 - fail fast on a broken install, before Ray starts
    from ..tasks.options import PredictOptions
    from ..weights.resolve import image_size_of, resolve

    check_output(output)
    files = resolve(model)
    image_size = image_size_of(files)  # from config.json or the .npz's shapes (224, 448, 896, ...)
    rows = read_inputs(input)
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError("input ids are not unique; give each row an 'id'")
    options = {"max_new_tokens": max_new_tokens}
    PredictOptions.from_kwargs(options)  # refuse what the model would refuse, before Ray starts
    run_labels = labels if labels is None or isinstance(labels, str) else list(labels)
    model_id = str(files.weights if files.format == "hf" else model)
    adapter, named = _checked_adapters(adapter, adapters)
    model_key = model_id + (f" + {adapter}" if adapter else "") + (f" ({quantize})" if quantize else "")
    for r in rows:
        r["prompt"], requested = prompt_for(task, r, labels=run_labels, question=question, prompt=prompt, lang=lang)
        r["labels"] = json.dumps(requested) if requested else ""  # a plain string column through Ray Data
        r["key"], r["adapter"] = row_key(task, r["prompt"], options, model_key), ""
        if isinstance(r["image"], Path):
            r["image"] = str(r["image"])
    if named:  # one row per (input, adapter), each with its own resume key
        rows = [{**r, "adapter": name, "key": row_key(task, r["prompt"], options, f"{model_key} @ {name}={path}")}
                for r in rows for name, path in named.items()]
    done = done_keys(output, retry_failed=retry_failed)
    todo = [r for r in rows if (r["id"], r["key"]) not in done]
    t0, started = time.perf_counter(), time.time()
    written, failed, stopped = 0, 0, None
    if todo:
        predictor_args = (model_id, dtype, str(output), fmt, options, task, adapter, quantize, named)
        preprocess = _preprocess_fn(image_size, str(files.preprocessor) if files.preprocessor else None)
        with _stop_on_signals() as stop:
            try:
                for n, n_failed in _run_pipeline(todo, preprocess, predictor_args, batch_size, num_workers, device,
                                                 address, progress):
                    written += n
                    failed += n_failed
            except KeyboardInterrupt:
                stopped = stop.get("signal", "SIGINT")
                # batches the workers finished (and wrote) before the driver saw them count too
                new = [r for r in _all_rows(output, ["id", "error"], newer_than=started)]
                written, failed = max(written, len(new)), max(failed, sum(1 for r in new if r.get("error")))
    per_adapter = {}
    if named:  # what this run wrote, per adapter (the summary line's columns)
        new = _all_rows(output, ["adapter"], newer_than=started)
        per_adapter = {name: sum(1 for r in new if r.get("adapter") == name) for name in named}
    return BatchSummary(total=len(rows), skipped=len(rows) - len(todo), written=written, failed=failed,
                        seconds=time.perf_counter() - t0, output=str(output), interrupted=stopped,
                        adapters=per_adapter)


def _checked_adapters(adapter, adapters) -> tuple[str | None, dict[str, str]]:
    """Every adapter folder read once here, so a bad one fails with the reason before Ray starts (not
    inside a worker); absolute paths (the workers may run in another folder)."""
    from ..weights.adapter import read_adapter

    if adapter and adapters:
        raise ValueError("give one adapter to merge (adapter=) or several served side by side (adapters=), not both")
    for path in [adapter] if adapter else list((adapters or {}).values()):
        read_adapter(path)
    return (str(Path(adapter).resolve()) if adapter else None,
            {name: str(Path(p).resolve()) for name, p in (adapters or {}).items()})


def _max_rank(adapters: dict[str, str] | None) -> int:
    from ..eval.adapters import adapter_rank

    return max((adapter_rank(p) for p in (adapters or {}).values()), default=16)


def init_ray(address: str | None = None, **kwargs: Any) -> None:
    """Join `address`, or start a local single-machine Ray that listens on loopback only (GCS, raylet,
    workers, agents all on 127.0.0.1; no dashboard). Ray turns a 127.0.0.1 node address into the
    machine's public IP unless its "no cluster" mode is on (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
    Ray's switch for laptops); palikit turns it on for the local Ray it starts."""
    import ray

    if ray.is_initialized():
        return
    if not address:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # the processes Ray starts read it at import
        try:
            import ray._private.ray_constants as ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported ray before the variable was set
        except (ImportError, AttributeError):
            pass
    ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True, **kwargs)


def _run_pipeline(todo, preprocess, predictor_args, batch_size, num_workers, device, address, progress):
    """Yield (rows written, of which failed) per finished batch, with one rich progress bar."""
    import ray

    init_ray(address)
    ray.data.DataContext.get_current().enable_progress_bars = False  # one bar of ours instead of Ray's
    use_gpu = device in ("cuda", "auto") and ray.cluster_resources().get("GPU", 0) > 0
    model_id, dtype, output, fmt, options, task, adapter, quantize, named = predictor_args
    ds = ray.data.from_items([{"id": r["id"], "key": r["key"], "image": r["image"], "prompt": r["prompt"],
                               "labels": r["labels"], "adapter": r["adapter"]}
                              for r in todo])
    ds = ds.map_batches(preprocess, batch_size=batch_size, batch_format="numpy")
    ds = ds.map_batches(
        _Predictor, fn_constructor_args=(model_id, "cuda" if use_gpu else "cpu", dtype, output, fmt, options, task,
                                         adapter, quantize, named),
        batch_size=batch_size, concurrency=num_workers, num_gpus=1 if use_gpu else 0, batch_format="numpy",
    )
    bar = _progress(f"batch {task}", len(todo)) if progress else None
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            n = len(batch["id"])
            if bar is not None:
                bar.advance(bar.task_ids[0], n)
            yield n, int(sum(batch["failed"]))
    finally:
        if bar is not None:
            bar.stop()


def _progress(description: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.start()
    bar.add_task(description, total=total)
    return bar


class _stop_on_signals:
    """SIGTERM raises KeyboardInterrupt like Ctrl-C does, so either stops the run between batches; the
    dict it yields names the signal."""

    def __enter__(self) -> dict[str, str]:
        self.info: dict[str, str] = {}
        self.previous = None

        def on_term(signum, frame):
            self.info["signal"] = "SIGTERM"
            raise KeyboardInterrupt

        try:
            self.previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: leave SIGTERM alone
            pass
        return self.info

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
