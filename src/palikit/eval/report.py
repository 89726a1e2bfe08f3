"""Reports: the cached-results table (other models' numbers kept in a JSON or CSV file), a Markdown
comparison table and PNG bar charts (accuracy, speed efficiency, cost efficiency per model). Every
file is written atomically (temporary file in the same folder, then `os.replace`).

Cached-results rows: {"model", "metric" (or "task"), "accuracy" (score x100, i.e. percent for
accuracies), "median_latency_s", "cost_per_call" ($ per sample), optional "device", "source", "n"}.
Missing speed / cost leave the efficiency columns empty. Efficiencies are recomputed from those
columns with the same definitions as the fresh run (runner module docstring).
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_bytes

COLUMNS = ["model", "metric", "accuracy", "median_latency_s", "cost_per_call", "speed_efficiency",
           "cost_efficiency", "source"]
CHARTS = {"accuracy": "Accuracy (score, %)", "speed_efficiency": "Median speed efficiency (score % / median s per sample)",
          "cost_efficiency": "Cost efficiency (score % / $ per sample)"}


def _num(v: Any) -> float | None:
    if v is None or v == "":
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def normalize_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """Typed row with the efficiency columns filled in from accuracy, latency and cost."""
    acc, lat, cost = _num(row.get("accuracy")), _num(row.get("median_latency_s")), _num(row.get("cost_per_call"))
    out = {"model": str(row.get("model", "?")), "metric": str(row.get("metric") or row.get("task") or ""),
           "accuracy": acc, "median_latency_s": lat, "cost_per_call": cost,
           "speed_efficiency": acc / lat if acc is not None and lat else None,
           "cost_efficiency": acc / cost if acc is not None and cost else None,
           "source": str(row.get("source") or "cached")}
    for k in ("device", "n", "task", "failed", "torch_threads", "mean_latency_s", "price", "domains"):
        if row.get(k) not in (None, ""):
            out[k] = row[k]
    return out


def _rows_of(data: Any, path: Path) -> list[Mapping[str, Any]]:
    """Rows of a parsed cached-results JSON: a list of rows, {"results": [...]}, or a palikit
    report.json (its "comparison" rows; a report without them gives its own row). Rows a palikit
    report made itself ("this run") are relabelled with the report's file name."""
    if isinstance(data, list):
        return data
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a list of rows, {{'results': [...]}} or a palikit report.json")
    if "results" in data:
        return data["results"]
    if "comparison" in data or ("model" in data and "score" in data):
        rows = data.get("comparison") or [{"model": data["model"], "metric": data.get("primary"),
                                           "task": data.get("task"), "accuracy": data["score"],
                                           "median_latency_s": (data.get("speed") or {}).get("median_s"),
                                           "cost_per_call": (data.get("cost") or {}).get("cost_per_sample"),
                                           "n": data.get("n"), "source": "this run"}]
        return [{**r, "source": f"{path.name} ({r.get('source')})" if r.get("source") != "this run"
                 else str(path)} for r in rows]
    raise ValueError(f"{path}: no 'results' list, and not a palikit report.json (no 'comparison' or 'score')")


def load_cached_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a cached-results file: JSON (a list of rows, {"results": [...]}, or a report.json that
    palikit eval wrote) or CSV with a header."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"--compare-with: no file {p}") from None
    if p.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not JSON (line {e.lineno}: {e.msg})") from None
        rows = _rows_of(data, p)
    return [normalize_row(r) for r in rows]


def save_cached_results(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Write rows (e.g. existing cache + `report.to_row()`) as JSON or CSV by suffix, atomically."""
    p = Path(path)
    rows = [normalize_row(r) for r in rows]
    if p.suffix.lower() == ".csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=COLUMNS + ["device", "n", "task"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        return atomic_write_bytes(p, buf.getvalue())
    return atomic_write_bytes(p, json.dumps(rows, indent=2))


def comparison_rows(report: Any, cached: Sequence[Mapping[str, Any]] = ()) -> list[dict[str, Any]]:
    """The fresh run first, then the cached rows for the same metric (rows without a metric kept)."""
    fresh = normalize_row(report.to_row())
    fresh["source"] = "this run"
    others = [normalize_row(r) for r in cached]
    others = [r for r in others if not r["metric"] or r["metric"] in (report.primary, report.task)]
    return [fresh, *others]


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if 0 < abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = ["model", "metric", "accuracy (%)", "median s / sample", "$ / sample", "speed eff. (%/s)",
            "cost eff. (%/$)", "source"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in COLUMNS) + " |")
    return "\n".join(lines)


SPEED_LABELS = {"median_s": "median latency (s per sample)", "p90_s": "p90 latency (s per sample)",
                "mean_s": "mean latency (s per sample)", "throughput_per_s": "throughput (samples / s)",
                "image_ms": "image encode (ms per sample, mean)", "prefill_ms": "prefill (ms per batch, mean)",
                "decode_ms": "decode (ms per batch, mean)", "decode_step_ms": "decode step (ms per batch step, median)",
                "decode_share": "decode share of prefill+decode (fraction)"}


def hardware_line(hw: Mapping[str, Any]) -> str:
    threads = hw.get("torch_threads")
    return (f"device {hw.get('device', '?')}; threads {threads if threads is not None else '-'}; "
            f"{hw.get('cpu_count', '?')} CPUs, load average {hw.get('load_avg_1m', '?')} at the end (shared machine "
            "if > 0)")


FIRST_REASONS = 5  # failed samples listed by reason in report.md and on stderr


def _pct(v: Any) -> str:
    """A metric fraction as x100 text; None (not defined on this data) is "n/a", never -100."""
    return "n/a" if v is None else _fmt(100 * float(v), 2)


def per_class_table(report: Any) -> list[str]:
    """Markdown lines of the per-class table (detect / segment on COCO): AP, AP@0.5 (and mask AP), ground-
    truth instances and, with negatives, how often the class was asked where absent and got a box."""
    metrics, per = report.metrics, report.counts.get("per_class", {})
    names = list(dict.fromkeys([k[6:].rsplit("/", 1)[0] for k in metrics if k.startswith("class/")] + list(per)))
    if not names:
        return []
    cols = [c for c in ("map", "map50", "mask_map", "mask_map50") if any(f"class/{n}/{c}" in metrics for n in names)]
    negatives = any(p.get("negative_queries") for p in per.values())
    head = ["class", *cols, "instances"] + (["asked where absent", "answered with a box", "FP rate"] if negatives else [])
    lines = ["", "## Per class (x100)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        p = per.get(n, {})
        cells = [n, *[_pct(metrics.get(f"class/{n}/{c}")) for c in cols], str(p.get("instances", "–"))]
        if negatives:
            q, h = p.get("negative_queries", 0), p.get("false_positive_queries", 0)
            cells += [str(q), str(h), _pct(h / q) if q else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    if negatives:
        q = sum(p.get("negative_queries", 0) for p in per.values())
        h = sum(p.get("false_positive_queries", 0) for p in per.values())
        lines += ["", f"- false-positive rate on absent classes (`--negatives`): {h} of {q} queries for a class the "
                      f"image does not hold were answered with a box = **{_pct(h / q if q else None)}%**"]
    return lines


def worst_section(report: Any, rel: str = "") -> list[str]:
    """Markdown lines linking the worst-predictions gallery (`eval.gallery`), with its samples listed;
    `rel`: the gallery's folder relative to the report's."""
    if not report.files.get("gallery"):
        return []
    name = rel + Path(report.files["gallery"]).name
    lines = ["", f"## Worst predictions ({len(report.worst)})", "", f"[![worst predictions]({name})]({name})", "",
             "White outlines: the ground truth; coloured: the model's boxes and masks.", "",
             "| sample | score (x100) | what went wrong |", "|---|---|---|"]
    return lines + [f"| {w['id']} | {_fmt(100 * w['score'])} | {w['why']} |" for w in report.worst]


def failure_lines(report: Any, limit: int = FIRST_REASONS) -> list[str]:
    """'sample ID: reason' for the first `limit` failed samples of `report`."""
    return [f"sample {f['id']}: {f['error']}" for f in report.failures[:limit]]


def markdown_report(report: Any, rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    rows = list(rows) if rows is not None else comparison_rows(report)
    sp, cost = report.speed, report.cost
    head = f"# Evaluation: {report.model} on {report.task}" + (" (INTERRUPTED: partial)" if report.interrupted else "")
    out = [head, "",
           f"- dataset: `{report.dataset}` ({report.n} of {report.total or report.n} samples; "
           f"{report.predicted_now} predicted in this call; {report.failed} failed"
           + (f"; {len(report.skipped)} skipped)" if report.skipped else ")"),
           f"- prompt: `{report.prompt}`",
           "- units: every score is x100 (percent for accuracies; CIDEr / mAP / mIoU on the same x100 scale); "
           "latencies are seconds per sample unless a row says per batch", "",
           "## Accuracy (x100)", "", "| metric | value |", "|---|---|"]
    out += [f"| {k}{' (primary)' if k == report.primary else ''} | {_pct(v)} |"
            for k, v in report.metrics.items() if not k.startswith("class/")]
    if any(v is None for k, v in report.metrics.items() if not k.startswith("class/")):
        out += ["", "n/a: not defined on this data (COCO's -1: no ground-truth objects of that kind, e.g. no "
                    "large objects for map_large)."]
    out += per_class_table(report)
    if report.failed:
        out += ["", f"{report.failed} failed sample(s) scored as empty answers; the first:", ""]
        out += [f"- {line}" for line in failure_lines(report)]
    if report.skipped:
        out += ["", f"{len(report.skipped)} bad row(s) / image(s) skipped (--skip-bad-rows), not scored; the first:",
                ""]
        out += [f"- {p['where']}: {p['error']}" for p in report.skipped[:FIRST_REASONS]]
    out += worst_section(report)
    out += ["", "## Speed", "", f"- {hardware_line(report.hardware)}", "", "| | value |", "|---|---|"]
    out += [f"| {SPEED_LABELS.get(k, k)} | {_fmt(v, 4)} |" for k, v in sp.items()]
    out += ["", f"- speed efficiency = score / median s per sample = {_fmt(report.score)} / "
                f"{_fmt(sp.get('median_s'), 4)} = **{_fmt(report.speed_efficiency)}**",
            f"- cost per sample ({cost.get('price', 'no price given')}) = {_fmt(cost.get('cost_per_sample'), 6)}; "
            f"cost efficiency = score / $ per sample = **{_fmt(report.cost_efficiency)}**",
            "- latency is end to end per sample (batch wall time / batch size); failed samples are not timed.",
            "", "## Comparison", "", markdown_table(rows), ""]
    return "\n".join(out)


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("charts need matplotlib: pip install matplotlib (or pass charts=False)") from e
    return plt


def bar_chart(names: Sequence[str], values: Sequence[float], path: str | Path, *, xlabel: str, title: str = "",
              colors: Sequence[str] | None = None, size: tuple[float, float] = (8, 4.5), dpi: int = 100) -> Path:
    """A horizontal bar chart (first name on top, each bar's value printed beside it) as a PNG of
    `size` inches x `dpi`, written atomically. Needs matplotlib (Agg backend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=size, dpi=dpi)
    vals = [0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v) for v in values]
    ax.barh(range(len(vals)), vals, color=list(colors) if colors else "tab:blue")
    ax.set_yticks(range(len(vals)), list(names))
    ax.invert_yaxis()
    ax.margins(x=0.15)
    ax.set_xlabel(xlabel)
    ax.set_title(title or xlabel, fontsize=10)
    for i, v in enumerate(values):
        ax.text(vals[i], i, f" {_fmt(v if v is None else float(v))}", va="center", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return atomic_write_bytes(Path(path), buf.getvalue())


def chart_labels(metric: str = "") -> dict[str, str]:
    """The x-axis label of each chart of `CHARTS`; the score chart names the metric unless it is an accuracy."""
    labels = dict(CHARTS)
    if metric and metric not in ("accuracy", "exact_match"):
        labels["accuracy"] = f"Score ({metric} x100)"
        labels["speed_efficiency"] = f"Median speed efficiency ({metric} x100 / median s per sample)"
        labels["cost_efficiency"] = f"Cost efficiency ({metric} x100 / $ per sample)"
    return labels


def write_charts(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, *, size: tuple[float, float] = (8, 4.5),
                 dpi: int = 100, title: str = "", metric: str = "") -> dict[str, Path]:
    """One horizontal bar chart per column of `CHARTS` (PNG, `size` inches x `dpi`), its axis named after
    `metric` (`chart_labels`); a chart whose column is empty for every row is skipped. Needs matplotlib."""
    _pyplot()
    out: dict[str, Path] = {}
    for key, label in chart_labels(metric).items():
        pts = [(f"{r['model']}" + ("" if r.get("source") != "this run" else " *"), r[key]) for r in rows
               if r.get(key) is not None]
        if not pts:
            continue
        names, vals = zip(*pts)
        colors = ["tab:orange" if n.endswith(" *") else "tab:blue" for n in names]
        out[key] = bar_chart(names, vals, Path(out_dir) / f"{key}.png", xlabel=label, size=size, dpi=dpi,
                             title=f"{title}: {label}" if title else label, colors=colors)
    return out


def write_report(report: Any, out_dir: str | Path, *, cached: Sequence[Mapping[str, Any]] = (),
                 charts: bool = True) -> dict[str, Path]:
    """report.json, report.md and (charts=True) accuracy / speed_efficiency / cost_efficiency PNGs."""
    out = Path(out_dir)
    rows = comparison_rows(report, cached)
    files = {"json": out / "report.json", "markdown": out / "report.md"}
    if charts:
        files.update(write_charts(rows, out, title=f"{report.task}: {report.primary}", metric=report.primary))
    report.files.update({k: str(v) for k, v in files.items()})
    atomic_write_bytes(files["json"], json.dumps({**report.to_dict(), "comparison": rows}, indent=2, default=str))
    atomic_write_bytes(files["markdown"], markdown_report(report, rows))
    return files


def attach_section(out_dir: str | Path, key: str, lines: Sequence[str], data: Mapping[str, Any]) -> None:
    """Add (or replace) the section `key` at the end of out_dir/report.md and `data` under `key` in
    report.json: what a later step of the same run (the sensitivity sweep) adds to the written report."""
    out = Path(out_dir)
    md, js = out / "report.md", out / "report.json"
    begin, end = f"<!-- {key}:start -->", f"<!-- {key}:end -->"
    text = md.read_text(encoding="utf-8") if md.exists() else ""
    if begin in text and end in text:
        text = text[:text.index(begin)].rstrip("\n") + text[text.index(end) + len(end):]
    atomic_write_bytes(md, text.rstrip("\n") + "\n\n" + "\n".join([begin, *lines, end]) + "\n")
    if js.exists():
        report = json.loads(js.read_text(encoding="utf-8"))
        report[key] = dict(data)
        atomic_write_bytes(js, json.dumps(report, indent=2, default=str))
