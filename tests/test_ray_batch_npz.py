"""Ray batch on a big_vision `.npz` whose resolution is not 224: the CPU stage resizes to the size the
checkpoint's own arrays give (it assumed 224 for every .npz, so 448/896 checkpoints failed)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import ray
from PIL import Image

from palikit.api import PaliGemma
from palikit.distributed.ray_batch import read_results, run_batch
from palikit.testing import make_tiny_checkpoint
from palikit.weights.big_vision import state_dict_to_npz
from palikit.weights.hf import load_hf_checkpoint
from palikit.weights.resolve import image_size_of, resolve

pytestmark = pytest.mark.slow  # a real Ray cluster


def test_npz_at_56px_runs_at_its_own_resolution(tmp_path):
    hf = make_tiny_checkpoint(tmp_path / "hf", family="pg2", image_size=56)  # 16 image tokens, not 224's 256
    model = load_hf_checkpoint(hf)
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "tiny-56.npz", **state_dict_to_npz(model.state_dict(), model.config))
    shutil.copy(hf / "tokenizer.json", folder)  # no preprocessor_config.json: the size must come from the arrays
    files = resolve(folder)
    assert (files.format, files.preprocessor, image_size_of(files)) == ("npz", None, 56)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + i, 70, 3), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        (tmp_path / "in").mkdir(exist_ok=True)
        shutil.move(tmp_path / f"img{i}.png", tmp_path / "in" / f"img{i}.png")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        summary = run_batch(tmp_path / "in", tmp_path / "out", "caption", str(folder), batch_size=2, device="cpu",
                            max_new_tokens=5, progress=False)
    finally:
        ray.shutdown()
    assert (summary.total, summary.failed) == (3, 0)
    pg = PaliGemma.from_pretrained(folder, device="cpu")
    for row in read_results(tmp_path / "out"):
        assert row["error"] == ""
        assert row["text"] == pg.predict(tmp_path / "in" / row["id"], "caption en", max_new_tokens=5).text
