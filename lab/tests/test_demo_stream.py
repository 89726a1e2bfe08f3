"""Shapes v2 made on the fly (`lab.demo.stream`): example i is the same in every process,
its segment codes are the stored build's, images are not the stored splits', the task mix covers
every shapes v2 task, `tasks` keeps to the asked ones, the hook's errors say what to set, and
`palikit train` trains on it with worker processes."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from palikit.demo import shapes2
from lab.demo.stream import STREAM_SEED, ShapesStream, shapes2_source
from palikit.assets import DEMO_MODEL_DIR
from palikit.tasks.mask_codec import MaskCodec, tokens_from_mask

CODEC = DEMO_MODEL_DIR / "vae-oid.npz"  # the v1 codec: same architecture as v2's


def _same(a, b):
    return (a.prefix, a.suffix, a.task) == (b.prefix, b.suffix, b.task) and \
        np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_an_example_is_the_same_every_time_and_after_pickling():
    s = ShapesStream(1000, seed=4, mask_codec=CODEC)
    again = pickle.loads(pickle.dumps(s))  # what a data worker gets
    for i in (0, 7, 999):
        assert _same(s[i], s[i]) and _same(s[i], again[i])
    assert not _same(s[0], ShapesStream(1000, seed=5, mask_codec=CODEC)[0])  # the recipe seed moves the images
    with pytest.raises(IndexError):
        s[1000]


def test_images_are_not_the_stored_splits():
    s = ShapesStream(20)
    for seed in shapes2.SPLIT_SEEDS.values():
        assert STREAM_SEED != seed
        assert not any(np.array_equal(np.asarray(s[i].image), np.asarray(shapes2.make_sample(i, seed).image))
                       for i in range(5))


def test_segment_rows_carry_the_codec_codes_of_the_build():
    stream, codec = ShapesStream(400, mask_codec=CODEC), MaskCodec.from_npz(CODEC)
    made = [(i, stream[i]) for i in range(30)]
    seg = [(i, ex) for i, ex in made if ex.task in ("segment", "refer_segment")][:2]
    assert seg, "no segment row in 30 examples"
    for i, ex in seg:
        rows = shapes2.examples(shapes2.make_sample(i, STREAM_SEED), random.Random(STREAM_SEED * 7_919 + i),
                                lambda sh: tokens_from_mask(codec, sh.mask, sh.box))
        assert "<seg" in ex.suffix and any((r["prefix"], r["suffix"]) == (ex.prefix, ex.suffix) for r in rows)


def test_the_mix_covers_every_task_and_tasks_keep_to_the_asked_ones():
    mix = Counter(ShapesStream(200)[i].task for i in range(200))  # no codec: no segment rows
    assert set(mix) == set(shapes2.TASKS) - {"segment", "refer_segment"}, mix
    assert 0.15 < mix["detect"] / 200 < 0.5  # the present classes' row and often a second one
    only = {ShapesStream(100, tasks=["ocr", "refer_detect"])[i].task for i in range(100)}
    assert only <= {"ocr", "refer_detect", "detect"} and {"ocr", "refer_detect"} <= only


def test_the_hook_needs_max_steps_a_codec_file_and_known_tasks(tmp_path):
    cfg = dict(max_steps=5, batch_size=4, seed=0, mask_codec=None, tasks=None)
    assert len(shapes2_source(SimpleNamespace(**cfg))) == 20
    for over, msg in [({"max_steps": None}, "set max_steps"), ({"mask_codec": str(tmp_path / "no.npz")}, "file not found"),
                      ({"tasks": ["ocr", "dance"]}, "dance are not shapes v2 tasks")]:
        with pytest.raises(ValueError, match=msg):
            shapes2_source(SimpleNamespace(**{**cfg, **over}))


@pytest.mark.slow
def test_palikit_train_on_the_stream_with_workers(tmp_path):
    """The real command (the console script, run from the checkout as lab/README.md says) on the bundled
    demo model: 3 steps of 8 fresh examples, made by 2 workers."""
    from pathlib import Path

    from lab.demo.paths import CHECKOUT

    out = tmp_path / "run"
    recipe = tmp_path / "stream.yaml"
    recipe.write_text(f"train_source: lab.demo.stream:shapes2_source\nmask_codec: {CODEC}\n"
                      f"output_dir: {out}\nbatch_size: 8\nmax_steps: 3\nlr: 1.0e-4\nwarmup: 0\n"
                      "data_workers: 2\nprogress: false\nplot: false\nlog_every: 1\n")
    palikit = Path(sys.executable).parent / "palikit"
    run = subprocess.run([str(palikit), "train", str(recipe)], capture_output=True, text=True, timeout=300, cwd=CHECKOUT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "24 examples" in run.stdout + run.stderr and "step 3/3" in run.stdout + run.stderr
    assert (out / "final" / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_gpu_script_trains_stops_at_its_budget_and_scores(tmp_path):
    """lab/probes/demo2_gpu.sh (the one device command for demo v2) rehearsed on the CPU from a bare
    checkout: it makes the v2 build itself (tokenizer, codec, a 12-image test split, the initial
    224 px / 28 px checkpoint warm-started from the bundled v1 model), pretrains the tower for 3 s on
    fresh images made by a worker and puts it in, runs 3 decoder-only caption steps on it, then a budget
    of 0.1 min ends the mix (tower frozen too) before its 400 steps; the run is exported and scored, and
    the last line is the JSON the device run brings back."""
    import json
    import os
    from pathlib import Path

    out, build = tmp_path / "out", tmp_path / "build"
    env = {**os.environ, "OUT": str(out), "BUILD": str(build),
           "BUILD_ARGS": "--train 4 --val 2 --test 12 --codec-images 8 --codec-steps 3",
           "STEPS": "400", "BATCH": "4", "WORKERS": "1", "LIMIT": "2", "MINUTES": "0.1", "PY": sys.executable,
           "TOWER_MINUTES": "0.05", "TOWER_BATCH": "8", "DECODER_STEPS": "3"}
    script = Path(__file__).parents[1] / "probes" / "demo2_gpu.sh"
    run = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:] + (out / "train.log").read_text()[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert 0 < result["steps"] < 400 and result["batch"] == 4
    built = json.loads((out / "build.json").read_text())
    assert built["version"] == 2 and built["splits"]["test"] == 12 and result["build_s"] >= 0
    assert (build / "init" / "model.safetensors").is_file() and (build / "vae-oid.npz").is_file()
    tower = json.loads((out / "tower.json").read_text())
    assert result["tower"]["steps"] == tower["steps"] > 0 and tower["tensors_replaced"] > 20
    assert tower["fresh"] and tower["train_images"] == 0 and tower["make_size"] == 224 and tower["augment"]
    assert tower["out"] == str(out / "tower-init")
    decoder_log = (out / "decoder.log").read_text()
    assert result["decoder_steps"] == 3 and "vision frozen" in decoder_log and "step 3/3" in decoder_log
    assert result["start"] == str(out / "decoder" / "final") and not (out / "decoder").exists()
    assert result["freeze_vision"] is True and "vision frozen" in (out / "train.log").read_text()
    assert "time budget (max_minutes=0.1) spent" in (out / "train.log").read_text()
    assert {"detect", "segment", "ocr", "caption", "refer_detect", "handmade"} <= set(result["scorecard"])
    assert (out / "run" / "final" / "model.safetensors").is_file() and not (out / "run" / "checkpoints").exists()
    assert json.loads((out / "result.json").read_text()) == result
