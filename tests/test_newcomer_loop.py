"""The README's newcomer loop (new data -> LoRA -> eval before and after -> serve -> query), run as
written: the bash block between the `newcomer-loop` markers in README.md is taken from the file and
run end to end in a temporary folder, so the README cannot drift from what works.

Checked: the block exits 0; the adapter beats the bundled model on the new words by a real margin
(both reports' own scores); the after report's comparison names both runs (the adapter's and the
before report's); one server serves both adapters and the base model (`/v1/models` lists them); its
answer over HTTP for the first adapter (curl and the official openai client naming it as the model) is
the adapter's (== `palikit ocr --adapter` == the after eval's prediction for that image, != the bundled
model's, != the same server's base-model answer).
Run with `-s` to see the time of each step."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- newcomer-loop:start -->", "<!-- newcomer-loop:end -->"


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1, "README.md needs one newcomer-loop block"
    section = text[text.index(START) + len(START):text.index(END)]
    m = re.fullmatch(r"\s*```bash\n(.*?)```\s*", section, re.S)
    assert m, "the newcomer-loop markers must hold exactly one ```bash block"
    return m.group(1)


def step_times(trace: str) -> list[tuple[float, str]]:
    """(seconds, command) per top-level command of the `bash -x` trace (PS4 carries the clock); the
    /readyz polling loop (for, seq, curl -sf, sleep) counts as one step."""
    marks = [(float(m.group(1)), m.group(2)) for m in re.finditer(r"^\+\[(\d+\.\d+)\] (.*)$", trace, re.M)]
    steps: list[tuple[float, str]] = []
    for (t0, cmd), (t1, _) in zip(marks, marks[1:]):
        if re.match(r"(for |seq |curl -sf |sleep )", cmd):
            cmd = "wait for the server's /readyz"
        if steps and steps[-1][1] == cmd:
            steps[-1] = (steps[-1][0] + t1 - t0, cmd)
        else:
            steps.append((t1 - t0, cmd))
    return steps


def test_readme_newcomer_loop_end_to_end(tmp_path):
    script = tmp_path / "loop.sh"
    # bash takes PS4 from the environment only when not root: the clock for the step times goes in the script
    script.write_text("PS4='+[$EPOCHREALTIME] '\n" + readme_block())
    env = dict(os.environ, PORT=str(free_port()), NO_COLOR="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the venv's bin
    t0 = time.perf_counter()
    proc = subprocess.Popen(["bash", "-e", "-x", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=600)
    finally:  # the block's server must not outlive a failed run
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    wall = time.perf_counter() - t0
    print(f"\nnewcomer loop: {wall:.1f} s in all")
    for dt, cmd in step_times(err):
        if dt >= 0.5:
            print(f"  {dt:7.1f} s  {cmd[:110]}")
    assert proc.returncode == 0, f"the README block failed (exit {proc.returncode}):\n{out[-3000:]}\n{err[-6000:]}"

    before = json.loads((tmp_path / "out/newwords-before/report.json").read_text())
    after = json.loads((tmp_path / "out/newwords-after/report.json").read_text())
    assert before["n"] == after["n"] >= 40 and before["failed"] == after["failed"] == 0
    # a real improvement, measured on the same new-word test set: the bundled model reads ~16%
    assert after["score"] >= before["score"] + 20, (before["score"], after["score"])
    assert after["metrics"]["exact_match"] >= before["metrics"]["exact_match"] + 0.3, (before["metrics"], after["metrics"])

    rows = after["comparison"]
    adapter_row = next(r for r in rows if r["source"] == "this run")
    before_row = next(r for r in rows if r["source"] == "out/newwords-before/report.json")
    assert adapter_row["model"] == "demo + adapter runs/newwords/adapter" and before_row["model"] == "demo"
    assert adapter_row["accuracy"] == pytest.approx(after["score"])
    assert before_row["accuracy"] == pytest.approx(before["score"])
    md = (tmp_path / "out/newwords-after/report.md").read_text()
    assert "demo + adapter runs/newwords/adapter" in md and "out/newwords-before/report.json" in md

    answers = [json.loads(line) for line in out.splitlines() if line.startswith('{"text"')]
    served, small, base = answers  # one server: the adapter, the second adapter, the base model
    models = json.loads(next(line for line in out.splitlines() if line.startswith('{"object":"list"')))
    assert [m["id"] for m in models["data"]][1:] == ["newwords", "small"]
    assert small["text"] and base["text"] and base["text"] != served["text"]
    in_process = re.search(r"^ocr -> '(.*)'$", out, re.M)
    assert in_process, out[-2000:]
    assert served["text"] == in_process.group(1)
    assert re.search(r"^openai client: (.*)$", out, re.M).group(1) == served["text"]
    image_rows = [json.loads(x) for x in (tmp_path / "data/newwords/test_ocr.jsonl").read_text().splitlines()]
    i = next(k for k, r in enumerate(image_rows) if r["image"] == "test/000001.png")

    def prediction(report_dir: str) -> str:
        preds = [json.loads(x) for x in (tmp_path / report_dir / "predictions.jsonl").read_text().splitlines()]
        return next(p["text"] for p in preds if p["id"] == str(i))

    assert served["text"] == prediction("out/newwords-after")
    assert served["text"] != prediction("out/newwords-before")
