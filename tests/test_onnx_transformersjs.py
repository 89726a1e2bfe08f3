"""A client no one here wrote runs the export: transformers.js (npm `@huggingface/transformers`, pinned in
tests/js/package-lock.json, run by Node, offline, from the export folder) generates greedily on the demo
model's example images (the `make demo` test-split images, at the model's 112 px so nothing is resized)
for caption, detect, segment and OCR, and its tokens are compared with palikit's own engine:
- its processor builds palikit's ids (`<image>` x 16, BOS, prompt, "\\n": no BOS in front) and pixels;
- the fp32 export gives exactly palikit's tokens on every prompt; q8 at least 90 % of the answers
  token for token; q4 and q4f16 load and run (their agreement is printed, and asserted loosely).
`make test` installs Node (scripts/setup-system.sh) and the npm package (`npm ci --ignore-scripts`)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from palikit.api import PaliGemma
from palikit.cli.demo import demo_prompts
from palikit.demo import shapes
from palikit.weights.resolve import resolve

pytestmark = pytest.mark.slow  # exports the demo model and runs Node

JS = Path(__file__).parent / "js"
TASKS = ("caption", "detect", "segment", "ocr")
IMAGES = 8
MAX_NEW_TOKENS = 64


def _node() -> str:
    node = shutil.which("node")
    assert node, "Node is not installed: run `make test` (scripts/setup-system.sh installs nodejs and npm)"
    assert (JS / "node_modules" / "@huggingface" / "transformers").is_dir(), (
        "transformers.js is not installed: run `make test`, or `cd tests/js && npm ci --ignore-scripts`")
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip().lstrip("v").split(".")[0])
    assert major >= 20, f"transformers.js 4 (sharp) needs Node >= 20, found {major}"
    return node


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from palikit.onnx.export import export_onnx

    node = _node()
    tmp = tmp_path_factory.mktemp("tjs")
    pg = PaliGemma.from_pretrained("demo", device="cpu", dtype="float32")
    jobs = []
    for i in range(IMAGES):
        sample = shapes.make_sample(i, seed=shapes.SPLIT_SEEDS["test"], size=pg.model.config.vision.image_size)
        path = tmp / f"example{i}.png"
        sample.image.save(path)
        jobs += [{"image": str(path), "prompt": prompt, "task": task, "max_new_tokens": MAX_NEW_TOKENS}
                 for task, prompt, _, _ in demo_prompts(sample, shapes) if task in TASKS]
    (tmp / "jobs.json").write_text(json.dumps(jobs))
    out = tmp / "demo-onnx"
    export_onnx(pg.model, out, tokenizer_file=resolve("demo").tokenizer, processor=pg.processor,
                quantize=("q8", "q4", "q4f16"), log=lambda m: None)
    results = pg.predict_batch([j["image"] for j in jobs], [j["prompt"] for j in jobs], max_new_tokens=MAX_NEW_TOKENS,
                                constrained=False)  # the raw model: what the export runs
    return node, pg, out, tmp / "jobs.json", jobs, [r.tokens for r in results]


def run_transformersjs(node: str, out: Path, dtype: str, jobs_file: Path) -> list[dict]:
    done = subprocess.run([node, str(JS / "generate.mjs"), str(out), dtype, str(jobs_file)], capture_output=True,
                          text=True, timeout=600, cwd=JS)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def answers(rows: list[dict], eos: int) -> list[list[int]]:
    return [r["generated"][:-1] if r["generated"] and r["generated"][-1] == eos else r["generated"] for r in rows]


def test_jobs_cover_every_task(setup):
    _, _, _, _, jobs, _ = setup
    assert {j["task"] for j in jobs} == set(TASKS)


def test_fp32_transformersjs_builds_palikits_inputs_and_generates_its_tokens(setup):
    node, pg, out, jobs_file, jobs, ours = setup
    rows = run_transformersjs(node, out, "fp32", jobs_file)
    assert len(rows) == len(jobs)
    cfg = pg.model.config
    for job, row in zip(jobs, rows):
        expected_ids = [cfg.image_token_index] * cfg.vision.num_image_tokens + pg.tokenizer.encode_prompt(job["prompt"]).ids
        assert row["input_ids"] == expected_ids, job["prompt"]  # no second BOS in front of the image tokens
        pixels = float(pg.processor(job["image"]).sum())
        assert abs(row["pixel_sum"] - pixels) < 1e-3 * max(1.0, abs(pixels))
    theirs = answers(rows, cfg.eos_token_id)
    wrong = [(j["task"], j["prompt"], t, o) for j, t, o in zip(jobs, theirs, ours) if t != o]
    assert not wrong, f"{len(wrong)}/{len(jobs)} answers differ, first: {wrong[0]}"


@pytest.mark.parametrize("dtype, least", [("q8", 0.9), ("q4", 0.5), ("q4f16", 0.5)])
def test_quantized_transformersjs_agrees_with_palikit(setup, dtype, least):
    node, pg, out, jobs_file, jobs, ours = setup
    theirs = answers(run_transformersjs(node, out, dtype, jobs_file), pg.model.config.eos_token_id)
    same = sum(t == o for t, o in zip(theirs, ours)) / len(jobs)
    print(f"{dtype}: {same:.1%} of {len(jobs)} answers equal palikit's token for token")
    assert same >= least
