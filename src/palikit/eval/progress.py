"""Progress of an evaluation on stderr: a rich bar on a terminal, plain lines elsewhere (logs, CI,
`palikit eval ... 2>eval.log`), so a long run is never silent. Also what a speed table names: the
device, the torch thread count and the machine's load."""

from __future__ import annotations

import os
import sys
import time
from typing import Any


class LineProgress:
    """'LABEL: 40/200 (20%) accuracy 51.2%' on stderr (LABEL: 'eval NAME', or what the caller names the
    run, e.g. a sensitivity variant), at most every `every_s` seconds and at the end."""

    def __init__(self, name: str, total: int, done: int, every_s: float = 5.0):
        self.name, self.total, self.done, self.every_s = name, total, done, every_s
        self.metric = ""
        self._last = 0.0
        self._print(force=True)

    def _print(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        pct = 100 * self.done / self.total if self.total else 100.0
        print(f"{self.name}: {self.done}/{self.total} ({pct:.0f}%) {self.metric}".rstrip(), file=sys.stderr,
              flush=True)

    def update(self, advance: int, metric: str = "") -> None:
        self.done += advance
        self.metric = metric
        self._print(force=self.done >= self.total)

    def stop(self) -> None:
        if self.done < self.total:
            self._print(force=True)


class RichProgress:
    def __init__(self, name: str, total: int, done: int):
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[metric]}"), TimeRemainingColumn(),
                           console=Console(stderr=True), transient=False)
        self._p.start()
        self._id = self._p.add_task(escape(name), total=total, completed=done, metric="")

    def update(self, advance: int, metric: str = "") -> None:
        self._p.update(self._id, advance=advance, metric=metric)

    def stop(self) -> None:
        self._p.stop()


def progress(enabled: bool, name: str, total: int, done: int, label: str | None = None) -> Any:
    """A progress reporter with `update(advance, metric)` / `stop()`, or None when disabled; it reads
    `label`, by default 'eval NAME'."""
    name = label or f"eval {name}"
    if not enabled:
        return None
    return RichProgress(name, total, done) if sys.stderr.isatty() else LineProgress(name, total, done)


def describe_device(model: Any) -> str:
    """What ran the model, in words: the adapter's `device_name`, else torch's device (GPU name, or
    'cpu (N cores)')."""
    name = getattr(model, "device_name", None)
    if name:
        return str(name)
    dev = getattr(model, "device", None)
    if dev is None:
        return "unknown"
    if str(dev).startswith("cuda"):
        import torch

        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"{dev} ({os.cpu_count()} cores)" if str(dev) == "cpu" else str(dev)


def hardware(model: Any) -> dict[str, Any]:
    """Device, threads (torch intra-op threads of a torch model, or the adapter's `threads`), CPU count and the 1-minute load average
    at the end of the run: the context every speed figure needs."""
    threads = getattr(model, "threads", None)  # an adapter's own statement (Tesseract's OpenMP, remote)
    if threads is None and "torch" in sys.modules and hasattr(model, "device"):
        threads = sys.modules["torch"].get_num_threads()
    try:
        load = round(os.getloadavg()[0], 2)
    except OSError:
        load = None
    return {"device": describe_device(model), "torch_threads": threads, "cpu_count": os.cpu_count(),
            "load_avg_1m": load}
