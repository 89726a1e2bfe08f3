"""lab/probes/class_reading.py (issue 19): the per-shape tower probe pools each class's tokens and counts
the pairs it should, fits what it can separate, and the decoder measure scores exactly the caption's
class words, its rolled control being the same as the right image when a batch holds one image."""

import argparse
import json

import pytest

from palikit.demo.splits import write_split
from lab.probes import class_reading
from palikit.demo import shapes2

pytestmark = pytest.mark.slow  # a research probe: fits probes on a v2 checkpoint's tower


@pytest.fixture(scope="module")
def reading():
    return class_reading


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    import shutil

    from lab.demo.build import SPECS, build_initial_checkpoint, build_tokenizer
    from palikit.assets import DEMO_MODEL_DIR

    tmp = tmp_path_factory.mktemp("v2")
    shutil.copy(DEMO_MODEL_DIR / "vae-oid.npz", tmp / "vae-oid.npz")  # the initial checkpoint ships its codec
    return build_initial_checkpoint(tmp, build_tokenizer(tmp, 2), 0, SPECS[2])


def test_tower_probe_counts_each_image_class_pair_and_fits_them(reading, model):
    probe = reading.probe
    _, shares = probe.make_images(6, 777)
    expected = int((probe.cell_shares(shares, 8).flatten(2)[:, 1:probe.K].sum(-1) >= 0.5).sum())
    args = argparse.Namespace(checkpoint=str(model), cache=None, fit=6, val_images=2, workers=0)
    out = reading.tower_reading(args)
    assert out["fit_pairs"] == expected > 0 and out["val_pairs"] > 0
    assert out["fit_accuracy"] == 1.0  # a handful of 128-d points: separable
    assert 0 <= out["val_accuracy"] <= 1 and 0 < out["majority"] <= 1


def test_decoder_scores_every_class_word_and_rolled_is_a_control(reading, model, tmp_path):
    data = write_split(shapes2, tmp_path / "data", "validation", 3) / "validation.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    captions = [r["suffix"] for r in rows if r["task"] == "caption"]
    words = {*shapes2.CLASSES, *(shapes2.PLURALS2[c] for c in shapes2.CLASSES)}
    expected = sum(w in words for c in captions for w in c.replace(",", " ").split())
    args = argparse.Namespace(checkpoint=str(model), trainable=None, data=str(data), rows=256)
    out = reading.decoder_reading(args)
    assert out["captions"] == len(captions) == 3 and out["class_words"] == expected > 0
    assert 0 <= out["right_image"] <= 1 and 0 <= out["rolled_image"] <= 1
    one = reading.decoder_reading(argparse.Namespace(**{**vars(args), "rows": 1}))
    assert one["right_image"] == one["rolled_image"]  # one image a batch: rolling it changes nothing
